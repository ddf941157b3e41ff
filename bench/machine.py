"""What ran a benchmark: recorded in every bench/results file, since absolute numbers hold only there."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp", "i8mm")  # what int8 kernels pick by


def isa() -> list[str]:
    """The instruction-set extensions of ISA this CPU has (Linux: /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in ISA if name in flags]
    except OSError:
        pass
    return []


def describe() -> dict:
    """CPU model, its int8-relevant extensions, core count, platform and the load average now."""
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "isa": isa(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "loadavg_1_5_15": load}
