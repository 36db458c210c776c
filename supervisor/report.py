"""What a workload hands back to the CLI: a Report (ok, the summary's lines, why it failed), and the percentile its
latency lines use. A leaf: every workload driver imports it, and it imports none of them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    ok: bool = True
    lines: list[tuple[str, str]] = field(default_factory=list)
    failure: str = ""

    def add(self, key: str, value: Any) -> None:
        self.lines.append((key, str(value)))


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def p50_p99(seconds: list[float], digits: int) -> str:
    """"1.234 ms / 5.678 ms"; "n/a (none measured)" when a stop came before the first sample (never "nan ms")."""
    if not seconds:
        return "n/a (none measured)"
    return f"{percentile(seconds, .5) * 1e3:.{digits}f} ms / {percentile(seconds, .99) * 1e3:.{digits}f} ms"
