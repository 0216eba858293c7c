"""How the benchmarks print their figures: Markdown tables, pasted into the README as they are."""

from __future__ import annotations


def table(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(str(v) for v in row))
    print()
