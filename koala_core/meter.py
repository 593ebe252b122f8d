"""Wall time and peak resident memory of a stretch of work in this process (Linux)."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


def _read_hwm_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


_overall_kb = 0  # the process's peak across resets


def _fold() -> int:
    global _overall_kb
    kb = _read_hwm_kb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _overall_kb = max(_overall_kb, kb)
    return kb


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark for this process (`echo 5 > /proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Meter:
    """`with Meter() as m: ...` then m.seconds and m.peak_rss_mb (peak of this stretch where the
    kernel lets us reset the mark, else the process's peak so far)."""

    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    _t0: float = 0.0

    def __enter__(self) -> "Meter":
        _fold()
        _reset_hwm()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.peak_rss_mb = _fold() / 1024.0


def process_peak_rss_mb() -> float:
    """Peak RSS of the whole process since it started, across Meter's resets."""
    _fold()
    return _overall_kb / 1024.0
