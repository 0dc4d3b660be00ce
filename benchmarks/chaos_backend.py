"""The slow synthetic backend of bench_chaos.py: stands in for a GPU model that
holds its worker for ``delay_s`` seconds per job, and logs every job it runs so
the benchmark can count GPU time spent for clients that were gone.

Registered without packaging:
``GEOMGEN_BACKENDS="slow=benchmarks.chaos_backend:ChaosSlowBackend"`` with the
repository root on PYTHONPATH. ``CHAOS_JOB_LOG`` names the file that gets one
JSON line when a job starts and one when it ends (input name, pid, wall-clock
times in seconds).
"""

from __future__ import annotations

import json
import os
import threading
import time

from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.errors import GenerateError
from geomgen.optionspec import OptionSpec

BOX_GLB_TAG = b"glTF"


def _log(record: dict) -> None:
    """Append one JSON line to $CHAOS_JOB_LOG; one write() on an O_APPEND file,
    so lines from many worker processes do not interleave."""
    path = os.environ.get("CHAOS_JOB_LOG")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


class ChaosSlowBackend(Backend):
    """Waits ``delay_s`` (per request, default 0.5 s) without using the CPU,
    then returns the input GLB unchanged (inputs are small GLBs in geomgen's
    conventions)."""

    name = "slow"
    input_kind = "mesh"
    options_spec = (OptionSpec("delay_s", "number", 0.5, 0.0, 60.0, help="synthetic GPU time, seconds"),)

    def load(self) -> None:
        import trimesh  # noqa: F401  (a model load's stand-in: what the mesh path would import)

    def generate(self, job: GenerationInput) -> GenerationOutput:
        delay_s = float(job.options.get("delay_s", self.options.get("delay_s", 0.5)))
        start = time.time()
        _log({"event": "start", "input": job.input_name, "pid": os.getpid(), "t": start, "delay_s": delay_s})
        threading.Event().wait(delay_s)  # holds the "GPU", not the CPU
        _log({"event": "end", "input": job.input_name, "pid": os.getpid(), "t": time.time(), "start": start})
        if job.input_data[:4] != BOX_GLB_TAG:
            raise GenerateError("the slow synthetic backend takes GLB inputs only", code="bad_input")
        return GenerationOutput(glb=job.input_data, info={"delay_s": delay_s, "pid": os.getpid()})
