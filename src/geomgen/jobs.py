"""The broker's jobs: one record per accepted request, and the checks and
error maps around it.

Pure state and checks with no sockets; dispatch.py drives them. Times are
monotonic seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import logging

import msgpack

from geomgen import contract, defaults
from geomgen.errors import InputError, Stage
from geomgen.protocol import ClientRequest, JobState

log = logging.getLogger("geomgen.broker")


@dataclass
class AcceptedTerms:
    """What the broker keeps of a request that met the contract."""

    convert: dict  # conversion options, normalised (contract.ConvertOptions fields)
    backend_options: dict  # this request's options for its backend, scoped (and parsed when declared)
    options_checked: bool  # False: the backend declared no options here yet; checked at dispatch


@dataclass(eq=False)
class JobRecord:
    """One accepted request on its way through generate and convert."""

    job_id: str  # <broker id prefix>-<counter, hex>, the id workers see
    client: bytes  # the client's DEALER identity
    request: ClientRequest
    terms: AcceptedTerms
    scene_key: str  # scene_id, or client:<identity hex>
    accepted_at: float
    no_worker_timeout_s: float
    state: JobState = JobState.QUEUED
    waiting_in: str | None = None  # backend name or SDF_POOL while queued, else None
    attempt: int = 0  # dispatches to GPU workers so far
    lost: int = 0  # GPU workers lost while running it
    worker: bytes | None = None  # identity of the GPU worker running it
    dispatched_at: float | None = None  # first dispatch
    attempt_started_at: float = 0.0
    generate_s: float | None = None
    worker_generate_s: float | None = None
    gen_info: dict = field(default_factory=dict)
    debug_files: dict = field(default_factory=dict)
    glb: bytes | None = None  # kept until converted, for re-pushes
    sdf_attempt: int = 0  # pushes to the SDF pool so far
    sdf_lost: int = 0  # leases that ran out
    sdf_queued_at: float | None = None
    sdf_pushed_at: float = 0.0
    convert_s: float | None = None
    worker_convert_s: float | None = None
    input_digest: bytes | None = None  # SHA-256 of the input, for the result cache's keys
    generate_key: str | None = None  # the result cache's key of its GLB (None: not cached)
    convert_key: str | None = None  # ... and of its SDF package
    from_cache_generate: bool = False  # the GLB came from the result cache
    from_cache_convert: bool = False  # the package came from the result cache

    def timings(self, now: float) -> dict[str, float]:
        """Seconds spent so far: queue wait (accept to first dispatch), generate,
        SDF wait (GLB ready to the last push), convert, total; broker clock,
        plus the workers' own figures where they sent one."""
        first = self.dispatched_at if self.dispatched_at is not None else now
        out = {"queue_wait_s": first - self.accepted_at, "total_s": now - self.accepted_at}
        if self.generate_s is not None:
            out["generate_s"] = self.generate_s
        if self.worker_generate_s:
            out["worker_generate_s"] = self.worker_generate_s
        if self.sdf_queued_at is not None and self.sdf_attempt:
            out["sdf_wait_s"] = self.sdf_pushed_at - self.sdf_queued_at
        if self.convert_s is not None:
            out["convert_s"] = self.convert_s
        if self.worker_convert_s:
            out["worker_convert_s"] = self.worker_convert_s
        return {key: round(value, 6) for key, value in out.items()}


def validate_request(req: ClientRequest, is_known: Callable[[str], bool],
                     specs: Callable[[str], tuple | None]) -> AcceptedTerms:
    """Check a request against the contract before it is queued: ids, the
    output name, the input bytes, the no-worker wait, the conversion options
    and the backend's declared options (``specs(backend)``, None when not
    declared). Raises InputError (stage input) naming the field."""
    if not req.request_id:
        raise InputError("request_id is empty; give every item of a batch its own id", code="bad_request")
    if not req.backend:
        raise InputError("backend is empty; name a backend such as silhouette or mesh", code="bad_request")
    contract.check_output_name(req.output_name, "output_name")
    if not req.input_data:
        raise InputError(f"input {req.input_name!r} is empty; send the file's bytes", code="bad_request")
    contract.check_seconds("no_worker_timeout_s", req.no_worker_timeout_s)
    contract.check_seconds("deadline_s", req.deadline_s, allow_zero=False)
    contract.check_text("prompt", req.prompt)
    convert = contract.convert_options(req.convert).to_dict() if req.want_sdf else {}
    if not is_known(req.backend):
        raise InputError(f"unknown backend {req.backend!r}", code="unknown_backend")
    declared = specs(req.backend)
    options = contract.check_backend_options(req.backend, declared, req.backend_options)
    return AcceptedTerms(convert, options, declared is not None)


def peek_request_id(frames: list) -> str | None:
    """The request_id of an undecodable client message, if its body still shows one."""
    if len(frames) < 2:
        return None
    try:
        body = msgpack.unpackb(frames[1], raw=False)
    except Exception:  # garbage is expected here; nothing to answer then
        return None
    request_id = body.get("request_id") if isinstance(body, dict) else None
    return request_id if isinstance(request_id, str) else None


def peer_error(error: object, stage: Stage, code: str, fallback: str) -> dict[str, str]:
    """A worker's error map made safe to forward: known stage, string code and message."""
    error = error if isinstance(error, dict) else {}
    stages = {s.value for s in Stage}
    return {
        "stage": error.get("stage") if error.get("stage") in stages else stage.value,
        "code": error.get("code") if isinstance(error.get("code"), str) and error.get("code") else code,
        "message": error.get("message") if isinstance(error.get("message"), str) and error.get("message") else fallback,
    }


def declared_interval_s(value: float, peer: str) -> float:
    """A peer's declared heartbeat interval, clamped to PEER_HEARTBEAT_MIN_S ..
    PEER_HEARTBEAT_MAX_S (logged when it was not): a peer declaring 1e9 s would
    otherwise be alive forever to the liveness rule."""
    clamped = min(defaults.PEER_HEARTBEAT_MAX_S, max(defaults.PEER_HEARTBEAT_MIN_S, value))
    if clamped != value and _first_time(peer, "interval"):
        log.warning("%s declared a heartbeat interval of %r s; using %g s", peer, value, clamped)
    return clamped


def declared_slots(value: int, peer: str) -> int:
    """An SDF worker's declared slot count, clamped to 0 .. SDF_MAX_SLOTS (logged when it was not)."""
    clamped = min(defaults.SDF_MAX_SLOTS, max(0, value))
    if clamped != value and _first_time(peer, "slots"):
        log.warning("%s declared %r conversion slots; using %d", peer, value, clamped)
    return clamped


_LOGGED: set[tuple[str, str]] = set()  # (peer, what) already logged as clamped, so a status stream logs once


def _first_time(peer: str, what: str) -> bool:
    if (peer, what) in _LOGGED:
        return False
    if len(_LOGGED) > 10_000:  # bounded whatever strangers declare
        _LOGGED.clear()
    _LOGGED.add((peer, what))
    return True
