"""Memory: how much a device has free (for guards that refuse work that cannot fit), and the
peak a block of code uses (for the memory benchmarks)."""

from __future__ import annotations

import os
import threading

import torch


def available_bytes(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's ``MemAvailable``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def format_bytes(n: float) -> str:
    """Human-readable size, e.g. ``'3.2 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def resident_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``; elsewhere the
    maximum so far from ``getrusage``, a coarser stand-in)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a block of code, above what was held when it began.

    On CPU a daemon thread samples :func:`resident_bytes` every ``interval`` seconds (the
    operating system's maximum-RSS counter cannot be reset, so per-phase peaks need
    sampling); on CUDA the allocator's own peak counter is reset and read. Usage::

        with PeakMemory() as mem:
            work()
        mem.start, mem.peak, mem.increase   # bytes
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.005) -> None:
        self.device, self.interval = torch.device(device), interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def increase(self) -> int:
        """Peak minus the memory held at the start, in bytes."""
        return self.peak - self.start

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())
