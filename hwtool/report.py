"""Tables, progress bars and plots shared by the commands (rich; matplotlib imported lazily)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Bar:
    """A progress callback: bar(n, total) advances by n images out of total."""

    def __init__(self, progress: Progress, label: str):
        self.progress = progress
        self.task = progress.add_task(label, total=None)

    def __call__(self, n: int, total: int | None = None) -> None:
        if total is not None and self.progress.tasks[self.task].total != total:
            self.progress.update(self.task, total=total, completed=0)
        self.progress.advance(self.task, n)

    def stage(self, label: str) -> None:
        """Start a new phase on the same bar."""
        self.progress.update(self.task, description=label, total=None, completed=0)

    def staged(self, label: str, n: int, total: int) -> None:
        """A callback for multi-phase work: on_progress(stage, n, total)."""
        if self.progress.tasks[self.task].description != label:
            self.stage(label)
        self(n, total)


@contextlib.contextmanager
def progress_bar(console: Console, label: str, disable: bool = False) -> Iterator[Bar]:
    """A rich progress bar on stderr, as a Bar callback."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    disable = disable or not console.is_terminal  # no bar in logs and pipes
    with Progress(*columns, console=console, disable=disable, transient=True) as progress:
        yield Bar(progress, label)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "-"


def prune_tables(report) -> list:
    """Rich tables for a PruneReport: one row per block, then totals and verification."""
    from rich.table import Table

    blocks = Table(title=f"hwtool prune: threshold {report.threshold}, gates from {report.gate_source}")
    for col in ("block", "spelling", "width", "kept", "params before", "params after", "gate err naive",
                "gate err refit", "note"):
        blocks.add_column(col, justify="left" if col in ("spelling", "note") else "right")
    for b in report.blocks:
        blocks.add_row(
            str(b.index), b.spelling, str(b.width), str(b.kept), f"{b.params_before:,}", f"{b.params_after:,}",
            "-" if b.gate_error_naive is None else f"{b.gate_error_naive:.4f}",
            "-" if b.gate_error_refit is None else f"{b.gate_error_refit:.4f}",
            b.note,
        )
    totals = Table(title="totals")
    for col in ("", "before", "after", "after/before"):
        totals.add_column(col, justify="right")
    totals.add_row("parameters", f"{report.params_before:,}", f"{report.params_after:,}",
                   _ratio(report.params_after, report.params_before))
    totals.add_row("FLOPs (batch 1)", f"{report.flops_before:,}", f"{report.flops_after:,}",
                   _ratio(report.flops_after, report.flops_before))
    totals.add_row("file size", _mb(report.bytes_before), _mb(report.bytes_after),
                   _ratio(report.bytes_after, report.bytes_before))
    check = Table(title=f"verification on {report.calibration_images} calibration inputs")
    for col in ("max abs error", "max rel error", "top-1 agreement", "seconds"):
        check.add_column(col, justify="right")
    secs = ", ".join(f"{k} {v:.2f}" for k, v in report.seconds.items())
    if report.max_abs_error is None:
        check.add_row("-", "-", "-", secs)
    else:
        check.add_row(f"{report.max_abs_error:.4g}", f"{report.max_rel_error:.4g}",
                      "-" if report.top1_agreement is None else f"{report.top1_agreement:.2%}", secs)
    return [blocks, totals, check]
