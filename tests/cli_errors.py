"""The one-line error contract of the CLI, checked the same way by every command's tests."""

from __future__ import annotations


def one_line_error(res) -> str:
    """Assert a CliRunner result failed with exactly one 'error: ' line on stderr and no traceback."""
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]
