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


def describe() -> dict:
    """CPU model, core count, platform and the 1/5/15-minute load average now."""
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "loadavg_1_5_15": load}
