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


@contextlib.contextmanager
def progress_bar(console: Console, label: str, disable: bool = False) -> Iterator[Bar]:
    """A rich progress bar on stderr, as a Bar callback."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=disable, transient=True) as progress:
        yield Bar(progress, label)
