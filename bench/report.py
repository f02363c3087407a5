"""The printed table: one line per measurement, its budget and verdict, then notes."""

from __future__ import annotations

from dataclasses import dataclass, field

PASS, FAIL, INFO = "PASS", "FAIL", "info"


def seconds(value: float | None) -> str:
    """A duration for humans: µs/ms below a second, s above."""
    if value is None:
        return "-"
    if value < 0.001:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def megabytes(value: float | None) -> str:
    """Bytes as MB (10^6)."""
    return "-" if value is None else f"{value / 1e6:.0f} MB"


def size_label(n: int) -> str:
    """10^k for powers of ten, else the number with separators."""
    text = str(n)
    if n >= 1000 and text.strip("0") == "1":
        return f"10^{len(text) - 1}"
    return f"{n:,}"


@dataclass
class Line:
    """One table line."""

    row: str
    work: str
    n: str = ""
    median: str = "-"
    p90: str = "-"
    cpu: str = ""
    budget: str = ""
    verdict: str = INFO
    note: str = ""


@dataclass
class Report:
    """Lines and notes, printed as a fixed-width table."""

    header: list[str] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, line: Line) -> Line:
        """Append a line (and return it)."""
        self.lines.append(line)
        return self.lines[-1]

    def note(self, text: str) -> None:
        """Add a note printed under the table."""
        self.notes.append(text)

    @property
    def failed(self) -> list[Line]:
        """Lines whose budget failed."""
        return [line for line in self.lines if line.verdict == FAIL]

    def render(self) -> str:
        """The whole report as text."""
        columns = ("#", "measurement", "n", "median", "p90", "cpu", "budget", "result")
        rows = [
            (
                line.row,
                line.work,
                line.n,
                line.median,
                line.p90,
                line.cpu,
                line.budget,
                line.verdict + (f" ({line.note})" if line.note else ""),
            )
            for line in self.lines
        ]
        widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
        right = {2, 3, 4, 5}

        def fmt(values: tuple) -> str:
            cells = [
                str(v).rjust(widths[i]) if i in right else str(v).ljust(widths[i])
                for i, v in enumerate(values)
            ]
            return " | ".join(cells).rstrip()

        out = [*self.header, "", fmt(columns), "-+-".join("-" * w for w in widths)]
        out += [fmt(r) for r in rows]
        passed = sum(1 for line in self.lines if line.verdict == PASS)
        out.append("")
        out.append(f"budgets: {passed} PASS, {len(self.failed)} FAIL")
        if self.notes:
            out.append("")
            out.append("notes:")
            out += [f"  - {note}" for note in self.notes]
        return "\n".join(out)
