"""One backend job, run inside the backend process (backend_process.py).

Progress goes out through a callback as it happens; the job's one final
JobResult is returned as the frames the GPU worker forwards to the broker
unchanged.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from geomgen import defaults, protocol
from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.contract import scoped_options
from geomgen.errors import GeomgenError, Stage

log = logging.getLogger("geomgen.gpu_worker")

MAX_PROGRESS_CHARS = 500  # a progress detail longer than this is cut


def error_of(exc: BaseException) -> dict[str, str]:
    """The {stage, code, message} a job failure reports: a GeomgenError keeps its
    own; anything else is a generate-stage ``generate_failed`` naming the type."""
    if isinstance(exc, GeomgenError):
        return exc.to_dict()
    text = str(exc) or "(no message)"
    return protocol.error_dict(Stage.GENERATE, "generate_failed", f"the backend raised {type(exc).__name__}: {text}")


def run_job(backend: Backend, backend_name: str, job: protocol.Job,
            send_progress: Callable[[list[bytes]], None]) -> list[bytes]:
    """Generate in a fresh temporary work dir (removed after), passing each
    progress report's frames to ``send_progress`` (maybe from a backend's own
    thread), and return the frames of exactly one JobResult. Never raises."""
    started_s = time.monotonic()
    finished = threading.Event()
    work_dir = Path(tempfile.mkdtemp(prefix=f"geomgen-{backend_name}-"))

    def progress(detail: str) -> None:
        if finished.is_set():  # a backend thread reporting after the result: nobody listens
            return
        send_progress(protocol.encode(protocol.JobProgress(job.job_id, job.attempt, str(detail)[:MAX_PROGRESS_CHARS])))

    try:
        request = GenerationInput(
            input_name=job.input_name,
            input_data=job.input_data,
            work_dir=work_dir,
            prompt=job.prompt,
            options=scoped_options(job.backend_options, backend_name),
            debug=job.debug,
            progress=progress,
        )
        output = backend.generate(request)
        return _success_frames(backend_name, job, output, time.monotonic() - started_s)
    except BaseException as exc:  # noqa: BLE001 - any failure is this job's, never the worker's
        if not isinstance(exc, GeomgenError):
            log.exception("backend %s raised on job %s", backend_name, job.job_id, extra={"job_id": job.job_id})
        return _failure_frames(job, error_of(exc), time.monotonic() - started_s)
    finally:
        finished.set()
        shutil.rmtree(work_dir, ignore_errors=True)


def _success_frames(backend_name: str, job: protocol.Job, output: GenerationOutput, seconds: float) -> list[bytes]:
    glb = getattr(output, "glb", None)
    if not isinstance(output, GenerationOutput) or not isinstance(glb, (bytes, bytearray)) or not glb:
        return _failure_frames(job, protocol.error_dict(
            Stage.GENERATE, "generate_failed",
            f"backend {backend_name!r} returned no GLB bytes (got {type(output).__name__})",
        ), seconds)
    result = protocol.JobResult(
        job.job_id, job.attempt, ok=True, glb=bytes(glb), seconds=seconds,
        info=dict(output.info or {}), debug_files=dict(output.debug_files or {}),
    )
    try:
        frames = protocol.encode(result)
    except (TypeError, ValueError) as exc:  # msgpack cannot carry something in info / debug_files
        return _failure_frames(job, protocol.error_dict(
            Stage.GENERATE, "generate_failed", f"backend {backend_name!r} returned info that cannot be sent ({exc})",
        ), seconds)
    limit = defaults.MAX_GLB_BYTES + defaults.MESSAGE_MARGIN_BYTES
    if len(frames[1]) > limit:
        # The broker would cut the connection on a message this large: fail the job instead.
        return _failure_frames(job, protocol.error_dict(
            Stage.GENERATE, "too_large",
            f"the GLB and debug files come to {len(frames[1]) / 2**20:.0f} MiB, over the {limit / 2**20:.0f} MiB "
            "a worker may send; lower the face count or texture size",
        ), seconds)
    return frames


def _failure_frames(job: protocol.Job, error: dict, seconds: float) -> list[bytes]:
    return protocol.encode(protocol.JobResult(job.job_id, job.attempt, ok=False, error=error, seconds=seconds))
