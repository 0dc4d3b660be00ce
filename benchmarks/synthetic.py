"""Synthetic backends the benchmarks register through GEOMGEN_BACKENDS.

`TimedBackend` stands in for a GPU model: it waits `delay_s` (the GPU time T)
and returns the GLB file named by `glb_path`, so the rest of the pipeline
(broker, SDF pool, real conversion) runs for real.
"""

from __future__ import annotations

import threading
from pathlib import Path

from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.errors import InputError


class TimedBackend(Backend):
    name = "timed"
    input_kind = "mesh"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        try:
            self.delay_s = float(self.options.get("delay_s", "0.5"))
        except ValueError:
            raise InputError(f"delay_s must be a number, got {self.options['delay_s']!r}") from None
        self.glb_path = self.options.get("glb_path")

    def generate(self, job: GenerationInput) -> GenerationOutput:
        # Event.wait, not time.sleep: the worker's loop keeps running beside it either way.
        threading.Event().wait(self.delay_s)
        glb = Path(self.glb_path).read_bytes() if self.glb_path else job.input_data
        return GenerationOutput(glb=glb, info={"synthetic_delay_s": self.delay_s})
