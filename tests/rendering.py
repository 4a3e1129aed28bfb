"""How the tests look at what a command prints: rendered as in an 80-column pipe or log."""

from __future__ import annotations

import io

from rich.console import Console


def render(*renderables, width: int = 80) -> str:
    """The text the renderables print on a console `width` columns wide; asserts that no line is
    wider and that nothing was cut short with an ellipsis."""
    console = Console(width=width, record=True, file=io.StringIO())
    for r in renderables:
        console.print(r)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width and "…" not in text, text
    return text
