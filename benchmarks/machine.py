"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The processor's name as /proc/cpuinfo gives it (Linux), else platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    """cores, processor, Python version and the 1-minute load average now."""
    return {"cpus": os.cpu_count(), "processor": cpu_model(), "python": platform.python_version(),
            "load_1min": round(os.getloadavg()[0], 2)}
