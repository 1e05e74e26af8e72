"""Peak memory while something runs: this process's resident set (psutil) and, on NVIDIA machines, the
GPU memory this process holds (nvidia-smi's per-process accounting), each sampled from its own thread
so that a slow nvidia-smi call never hides a short resident-set peak."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from types import TracebackType

import psutil


def device_used_mb(pid: int | None = None) -> int | None:
    """GPU memory in MiB held by process `pid` (default: this one) over all GPUs; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    used = 0
    for line in out.stdout.strip().splitlines():
        fields = [part.strip() for part in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            used += int(fields[1])
    return used


class PeakMemory:
    """`with PeakMemory() as peak: work()`, then `peak.growth()`: (peak - start) in MiB of the resident set
    and of this process's GPU memory (None without a GPU)."""

    def __init__(self, interval: float = 0.02, device_interval: float = 0.25) -> None:
        self._process = psutil.Process()
        self._interval, self._device_interval = interval, device_interval
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.rss_mb = self.start_rss_mb = 0.0
        self.device_mb: int | None = None
        self.start_device_mb: int | None = None

    def __enter__(self) -> PeakMemory:
        self._sample_rss()
        self.start_rss_mb = self.rss_mb
        self.device_mb = self.start_device_mb = device_used_mb()
        self._threads = [threading.Thread(target=self._poll, args=(self._sample_rss, self._interval), daemon=True)]
        if self.device_mb is not None:
            self._threads.append(threading.Thread(target=self._poll, args=(self._sample_device, self._device_interval),
                                                  daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._sample_rss()

    def growth(self) -> tuple[float, float | None]:
        device = None
        if self.device_mb is not None and self.start_device_mb is not None:
            device = float(self.device_mb - self.start_device_mb)
        return self.rss_mb - self.start_rss_mb, device

    def _poll(self, sample: Callable[[], None], interval: float) -> None:
        while not self._stop.wait(interval):
            sample()

    def _sample_rss(self) -> None:
        self.rss_mb = max(self.rss_mb, self._process.memory_info().rss / 2**20)

    def _sample_device(self) -> None:
        used = device_used_mb()
        if used is not None and self.device_mb is not None:
            self.device_mb = max(self.device_mb, used)
