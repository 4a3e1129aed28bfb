"""Tables, progress bars and plots shared by the commands (rich; matplotlib imported lazily)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from hwtool.prune import PruneReport
    from hwtool.sweep import SweepRow


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


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}x" if a is not None and b else "-"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def prune_tables(report: PruneReport) -> list[Table]:
    """Rich tables for a PruneReport: one row per block, then totals and verification."""
    # Sized to fit 80 columns (a pipe, a log): numbers never wrap, headers take two lines, the mix
    # spelling is named in the title when every block shares it (else a letter per block, spelled
    # out below the table), and notes go below the table too.
    spellings = sorted({b.spelling for b in report.blocks})
    title = f"hwtool prune: threshold {report.threshold:.4g}, gates from {report.gate_source}"
    if report.budget is not None:
        title = (
            f"hwtool prune: threshold {report.threshold:.4g} for a budget of {report.budget:.1%} of the "
            f"parameters, gates from {report.gate_source}"
        )
    below = []
    if len(spellings) == 1:
        title += f"; every block mixes as {spellings[0]}"
    else:
        below.append("mix " + "; ".join(f"{chr(97 + i)}: {m}" for i, m in enumerate(spellings)))
    if report.respelled:
        below.append("respelled to find the blocks, and written so: " + "; ".join(report.respelled))
    below += [f"block {b.index}: {b.note}" for b in report.blocks if b.note]
    if 0 < report.refit_samples < report.calibration_images:
        below.append(f"refit on the first {report.refit_samples} of {report.calibration_images} calibration samples")
    moved = [b for b in report.blocks if b.transform_error_naive is not None]
    if moved:
        naive = sum(b.transform_error_naive for b in moved) / len(moved)
        refit = sum(b.transform_error_refit for b in moved) / len(moved)
        projected = sum(b.carry_error_naive is not None for b in report.blocks)
        also = f" (and {projected} carry projections)" if projected else ""
        below.append(
            f"transforms refitted in {len(moved)} blocks whose input pruning moved{also}: relative "
            f"error {naive:.3f} -> {refit:.3f} (mean)"
        )
    blocks = Table(title=title, caption="\n".join(below) or None, caption_justify="left")
    columns = ["block", *(["mix"] if len(spellings) > 1 else []), "width", "kept", "params\nbefore"]
    for col in (*columns, "params\nafter", "gate err\nplain", "gate err\nrefit"):
        blocks.add_column(col, justify="right", no_wrap=True)
    for b in report.blocks:
        mix = [chr(97 + spellings.index(b.spelling))] if len(spellings) > 1 else []
        errors = ["-" if e is None else f"{e:.4f}" for e in (b.gate_error_naive, b.gate_error_refit)]
        blocks.add_row(
            str(b.index), *mix, str(b.width), str(b.kept), f"{b.params_before:,}", f"{b.params_after:,}", *errors
        )
    totals = Table(title="totals")
    for col in ("", "before", "after", "after/before"):
        totals.add_column(col, justify="right", no_wrap=True)
    totals.add_row(
        "parameters",
        f"{report.params_before:,}",
        f"{report.params_after:,}",
        _ratio(report.params_after, report.params_before),
    )
    totals.add_row(
        "FLOPs (batch 1)",
        _count(report.flops_before),
        _count(report.flops_after),
        _ratio(report.flops_after, report.flops_before),
    )
    totals.add_row(
        "file size", _mb(report.bytes_before), _mb(report.bytes_after), _ratio(report.bytes_after, report.bytes_before)
    )
    verified = report.calibration_images > 0
    check = Table(
        title=f"verification on {report.calibration_images} calibration inputs"
        if verified
        else "no verification: no calibration inputs (give --calib or --data to compare with the original)"
    )
    for col in ("max abs error", "max rel error", "top-1 agreement", "seconds"):
        check.add_column(col, justify="right", no_wrap=True)
    secs = "\n".join(f"{k} {v:.2f}" for k, v in report.seconds.items())
    check.add_row(
        "-" if report.max_abs_error is None else f"{report.max_abs_error:.4g}",
        "-" if report.max_rel_error is None else f"{report.max_rel_error:.4g}",
        "-" if report.top1_agreement is None else f"{report.top1_agreement:.2%}",
        secs,
    )
    return [blocks, totals, check]


def plain_table(title: str, caption: str | None = None) -> Table:
    """A table with a rule under its header and no other lines, one space between columns: the
    style of the wide tables (sweep, bench), which must fit an 80-column pipe or log."""
    return Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def _figure(v: float | None, places: int) -> str:
    """v to `places` decimals, or to two significant digits where those would show less than two
    (a small fully connected model's MB, MFLOPs and milliseconds); '-' for None."""
    if v is None:
        return "-"
    return f"{v:.2g}" if 0 < abs(v) < 10 ** (1 - places) else f"{v:.{places}f}"


def sweep_table(rows: list[SweepRow], model: str | os.PathLike) -> Table:
    """A rich table of SweepRows, one per threshold (the original first; a row pruned to a budget
    shows the threshold found and '≤' the budget); it fits 80 columns."""
    from hwtool.sweep import quality

    measure = quality(rows)
    caption = {
        "accuracy": None,
        "agreement": "agree: top-1 agreement with the original on the calibration inputs",
        "max_abs_error": "max err: max abs difference from the original's outputs on the calibration inputs",
    }[measure]
    table = plain_table(f"hwtool sweep {model}", caption)
    name = {"accuracy": "top-1", "agreement": "agree", "max_abs_error": "max err"}[measure]
    for col in ("threshold", "kept", "params", "MB", "MFLOPs", name, "p50 ms\nbatch 1", "p50 ms\nbatch 64"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        value = getattr(r, measure)
        table.add_row(
            "original"
            if r.threshold is None
            else f"{r.threshold:g}"
            if r.budget is None
            else f"{r.threshold:.3g} ≤{r.budget * 100:g}%",
            f"{r.kept_channels}/{r.channels}",
            f"{r.parameters:,}",
            _figure(r.bytes / 1e6, 2),
            _figure(None if r.flops is None else r.flops / 1e6, 1),
            "-" if value is None else f"{value:.3g}" if measure == "max_abs_error" else f"{value:.2%}",
            _figure(r.p50_ms_batch1, 2),
            _figure(r.p50_ms_batch64, 1),
        )
    return table


# ---------------------------------------------------------------------------------------------
# gate heat maps and sweep plots (matplotlib, imported lazily, Agg backend)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gate_heatmap(panels: list[tuple[str, list]], sort: bool = True) -> bytes:
    """PNG of one panel per model: rows are blocks, columns channels, colour is mean T.

    panels: (title, per-block mean arrays). Blocks narrower than the widest are padded with blank.
    """
    import numpy as np

    plt = _pyplot()
    from matplotlib.colors import LogNorm

    width = max(len(m) for _, means in panels for m in means)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 0.28 * max(len(m) for _, m in panels) + 2.2), squeeze=False
    )
    image = None
    for ax, (title, means) in zip(axes[0], panels):
        grid = np.full((len(means), width), np.nan)
        for i, m in enumerate(means):
            row = np.sort(m)[::-1] if sort else np.asarray(m)
            grid[i, : len(row)] = row
        # Log colour scale: the interesting gates live between 0.001 and 0.1.
        image = ax.imshow(
            np.clip(grid, 1e-3, 1.0), aspect="auto", cmap="magma", norm=LogNorm(1e-3, 1.0), interpolation="nearest"
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("channel" + (" (sorted by mean T)" if sort else ""))
        ax.set_ylabel("block")
        ax.set_yticks(range(len(means)))
    fig.colorbar(image, ax=axes[0].tolist(), label="mean gate T (log scale)", shrink=0.9)
    return _png(fig)


def _png(fig) -> bytes:
    """The figure as PNG bytes; closes it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


GATE_THRESHOLDS = (0.01, 0.02, 0.05, 0.1, 0.2)


def gate_table(title: str, means: list) -> Table:
    """Per-block mean T and the fraction of channels under common thresholds."""
    import numpy as np

    table = Table(title=title)
    table.add_column("block", justify="right")
    table.add_column("width", justify="right")
    table.add_column("mean T", justify="right")
    for t in GATE_THRESHOLDS:
        table.add_column(f"< {t}", justify="right")
    for i, m in enumerate(means):
        m = np.asarray(m)
        table.add_row(str(i), str(len(m)), f"{m.mean():.3f}", *[f"{(m < t).mean():.0%}" for t in GATE_THRESHOLDS])
    allm = np.concatenate([np.asarray(m) for m in means])
    table.add_row("all", str(len(allm)), f"{allm.mean():.3f}", *[f"{(allm < t).mean():.0%}" for t in GATE_THRESHOLDS])
    return table


SWEEP_MEASURES = {  # SweepRow field -> (plot label, scale)
    "accuracy": ("top-1 accuracy (%)", 100.0),
    "agreement": ("top-1 agreement with the original (%)", 100.0),
    "max_abs_error": ("max abs error against the original", 1.0),
}


def sweep_plot(rows: list[dict], title: str, measure: str = "accuracy") -> bytes:
    """PNG of a measure of the pruned models (`SWEEP_MEASURES`; rows hold it under its name) and
    model size against threshold, on two y axes."""
    plt = _pyplot()
    label, scale = SWEEP_MEASURES[measure]
    th = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(th, [scale * r[measure] for r in rows], "o-", color="tab:blue", label=label)
    ax.set_xlabel("gate threshold")
    ax.set_ylabel(label, color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(th, [r["bytes"] / 1e6 for r in rows], "s--", color="tab:red", label="file size")
    ax2.set_ylabel("file size (MB)", color="tab:red")
    ax2.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)
