"""Peak memory while something runs: the process's resident set (psutil) and, on NVIDIA machines,
the device memory in use (nvidia-smi), sampled from a background thread."""

from __future__ import annotations

import shutil
import subprocess
import threading
from types import TracebackType

import psutil


def device_used_mb() -> int | None:
    """Memory in use on GPU 0 in MiB, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--id=0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True)
        return int(float(out.stdout.strip().splitlines()[0]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class PeakMemory:
    """`with PeakMemory() as peak: work()` → `peak.rss_mb`, `peak.device_mb` (maxima seen, in MiB)."""

    def __init__(self, interval: float = 0.02, device_interval: float = 0.25) -> None:
        self._process = psutil.Process()
        self._interval, self._device_interval = interval, device_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rss_mb = 0.0
        self.device_mb: int | None = None
        self.start_rss_mb = 0.0
        self.start_device_mb: int | None = None

    def __enter__(self) -> PeakMemory:
        self._sample_rss()
        self.start_rss_mb = self.rss_mb
        self.device_mb = self.start_device_mb = device_used_mb()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_rss()

    def growth(self) -> tuple[float, float | None]:
        """(peak - start) of the resident set and of GPU memory in MiB; the GPU's None without one."""
        device = None
        if self.device_mb is not None and self.start_device_mb is not None:
            device = float(self.device_mb - self.start_device_mb)
        return self.rss_mb - self.start_rss_mb, device

    def _sample_rss(self) -> None:
        self.rss_mb = max(self.rss_mb, self._process.memory_info().rss / 2**20)

    def _run(self) -> None:
        ticks_per_device = max(1, round(self._device_interval / self._interval))
        tick = 0
        while not self._stop.wait(self._interval):
            self._sample_rss()
            tick += 1
            if self.device_mb is not None and tick % ticks_per_device == 0:
                used = device_used_mb()
                if used is not None:
                    self.device_mb = max(self.device_mb, used)
