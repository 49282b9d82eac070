"""Plain-text tables driven by column specs: one printer for every benchmark table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

Key = Union[str, Callable[[dict], Any]]


@dataclass(frozen=True)
class Col:
    """One column: its title, where its value comes from, and how to show it.

    ``key`` is a row key or a function of the row; a missing or ``None`` value prints "-".
    Numbers are multiplied by ``scale`` and shown with the format spec ``fmt``.
    """

    title: str
    key: Key
    fmt: str = ".3f"
    scale: float = 1.0
    width: int = 0  # 0: as wide as the title, at least 8

    def value(self, row: dict) -> Any:
        return self.key(row) if callable(self.key) else row.get(self.key)

    def cell(self, row: dict) -> str:
        v = self.value(row)
        if v is None:
            text = "-"
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            text = format(v * self.scale if self.scale != 1.0 else v, self.fmt)
        else:
            text = str(v)
        return text.rjust(self.size)

    @property
    def size(self) -> int:
        return self.width or max(8, len(self.title))


def print_table(title: str, rows: dict[str, dict], cols: list[Col], label: str = "method") -> None:
    """Print ``rows`` (label -> row dict) under ``title``; a row with "skipped" prints its reason."""
    width = max([len(label)] + [len(name) for name in rows]) + 1
    print(f"\n== {title}")
    print("   " + label.ljust(width) + " ".join(c.title.rjust(c.size) for c in cols))
    for name, row in rows.items():
        if "skipped" in row:
            print("   " + name.ljust(width) + f"skipped: {row['skipped']}")
        else:
            print("   " + name.ljust(width) + " ".join(c.cell(row) for c in cols))


def ms(title: str, key: Key, fmt: str = ".3f") -> Col:
    """A column of seconds shown in milliseconds."""
    return Col(title, key, fmt, scale=1e3)


def us(title: str, key: Key, fmt: str = ".0f") -> Col:
    """A column of seconds shown in microseconds."""
    return Col(title, key, fmt, scale=1e6)


def mb(title: str, key: Key) -> Col:
    """A column of bytes shown in MB (1e6 bytes)."""
    return Col(title, key, ".1f", scale=1e-6)


def ratio(title: str, key: Key) -> Col:
    return Col(title, key, ".2f")
