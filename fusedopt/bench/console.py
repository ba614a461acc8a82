"""The bench's terminal output: rich when it is installed, else plain text.

A machine without rich (an offline GPU machine whose Python has only torch, Triton and the
test tools) still gets every table, as aligned plain text, and no progress bar.  The plain
classes implement only what the bench uses of rich's `Console`, `Table` and `Progress`.
"""

from __future__ import annotations

import re
import sys

try:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    from rich.table import Table
except ImportError:
    RICH = False
else:
    RICH = True

# rich's style tags as the bench writes them: [bold], [/bold red], [green] ...
_STYLE_TAG = re.compile(r"\[/?(?:bold|red|green|yellow|cyan)(?: (?:red|green|yellow|cyan))?\]")


def plain(text: str) -> str:
    """`text` without its rich style tags."""
    return _STYLE_TAG.sub("", str(text))


class PlainTable:
    """Columns aligned with spaces, under the title."""

    def __init__(self, title: str = "", **_style):
        self.title, self.columns, self.rows = plain(title), [], []

    def add_column(self, header: str, justify: str = "left", **_style):
        self.columns.append((plain(header), justify))

    def add_row(self, *cells: str):
        self.rows.append([plain(c) for c in cells])

    def __str__(self) -> str:
        cells = [[h for h, _ in self.columns], *self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = [self.title] if self.title else []
        for row in cells:
            lines.append("  ".join(c.ljust(w) if j == "left" else c.rjust(w)
                                   for c, w, (_, j) in zip(row, widths, self.columns)).rstrip())
        return "\n".join(lines) + "\n"


class PlainConsole:
    def __init__(self, **_options):
        pass

    def print(self, obj="", markup: bool = True, **_options):
        text = str(obj)
        print(plain(text) if markup else text, file=sys.stdout, flush=True)


class PlainProgress:
    """No bar: the tables follow when the work is done."""

    def __init__(self, *_columns, **_options):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: int | None = None) -> int:
        return 0

    def update(self, task: int, **_fields):
        pass

    def advance(self, task: int, steps: int = 1):
        pass


def make_console(width: int | None):
    return Console(width=width) if RICH else PlainConsole()


def make_table(title: str, **style):
    return Table(title=title, **style) if RICH else PlainTable(title)


def make_progress(console):
    if not RICH:
        return PlainProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def markup_escape(text: str) -> str:
    return escape(text) if RICH else text
