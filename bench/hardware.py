"""What a run ran on: CPU model and cores, memory, GPU and driver, library versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

import msgspec
import psutil


class Gpu(msgspec.Struct, frozen=True):
    name: str
    driver: str
    memory_mb: int


class Hardware(msgspec.Struct, frozen=True):
    cpu: str
    cores: int  # logical CPUs this process may use
    memory_gb: float
    gpus: list[Gpu]
    platform: str
    python: str


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[Gpu]:
    """NVIDIA GPUs as nvidia-smi reports them (none when it is absent or fails)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.stdout.strip().splitlines():
        name, driver, memory = ([*(part.strip() for part in line.split(",")), "", ""])[:3]
        try:
            megabytes = int(float(memory))
        except ValueError:  # "[N/A]" under MIG, say
            megabytes = 0
        found.append(Gpu(name=name, driver=driver, memory_mb=megabytes))
    return found


def describe() -> Hardware:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return Hardware(cpu=cpu_model(), cores=cores, memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
                    gpus=gpus(), platform=platform.platform(), python=platform.python_version())


def versions(*distributions: str) -> dict[str, str]:
    """Installed versions of the named distributions ("absent" where not installed)."""
    found = {}
    for dist in distributions:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "absent"
    return found
