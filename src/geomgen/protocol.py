"""The geomgen wire protocol: frames, commands, messages, encode / decode.

This is the only module that knows how messages look on the wire. Every
message is two frames after any ROUTER identity frame:

    frame 0  header: b"GGP" + version byte + command byte   (5 bytes)
    frame 1  body:   a msgpack map (str keys) for that command's dataclass

Roles build dataclasses and call :func:`encode`; they receive with
:func:`decode`, which returns a dataclass or raises :class:`ProtocolError`.
The same command means different messages on different channels, so decoding
takes the channel's schema. See docs/protocol.md for the frame tables.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

from geomgen import defaults
from geomgen.errors import ProtocolError

SIGNATURE = b"GGP"
VERSION = 1
HEADER_LEN = 5


class Command(enum.IntEnum):
    """Commands, after Majordomo MDP/0.2, plus HEALTH and CANCEL."""

    READY = 1  # a worker announces itself (GPU: backend; SDF: slots)
    REQUEST = 2  # a job: client -> broker, broker -> GPU worker, broker -> SDF worker
    PARTIAL = 3  # intermediate news about a job (progress, GLB ready)
    FINAL = 4  # the one final result of a job
    HEARTBEAT = 5  # liveness, both ways
    DISCONNECT = 6  # a peer leaves, or is told to go away
    HEALTH = 7  # statistics query and reply
    CANCEL = 8  # a client withdraws requests


class EventKind(str, enum.Enum):
    """What a PARTIAL from the broker to a client announces."""

    QUEUED = "queued"
    GENERATING = "generating"
    PROGRESS = "progress"
    GLB_READY = "glb_ready"
    CONVERTING = "converting"
    RETRYING = "retrying"


class JobState(str, enum.Enum):
    """Life cycle of a job inside the broker."""

    QUEUED = "queued"
    GENERATING = "generating"
    CONVERTING = "converting"
    DONE = "done"
    FAILED = "failed"


# --- messages: client <-> broker ---------------------------------------------


@dataclass
class ClientRequest:
    """One item of a batch. Files travel as bytes; paths stay with the client."""

    request_id: str
    backend: str
    input_name: str  # file name of the input, for its extension and for messages
    input_data: bytes
    output_name: str  # stem of the output files (GLB, SDF package folder)
    prompt: str | None = None
    scene_id: str | None = None
    backend_options: dict = field(default_factory=dict)  # BACKEND.KEY or plain keys; the old sam3d_config as sam3d.KEY
    convert: dict = field(default_factory=dict)  # conversion options (contract.ConvertOptions fields)
    want_sdf: bool = True
    debug: bool = False
    no_worker_timeout_s: float | None = None
    events: bool = True  # False: only the glb_ready PARTIAL (it carries the GLB) and the FINAL
    deadline_s: float | None = None  # the whole request (queue, generate, convert) within this, from acceptance
    fresh: bool = False  # compute anew even when the result cache holds it (the new result still refreshes it)


@dataclass
class HealthQuery:
    pass


@dataclass
class ClientHeartbeat:
    """A waiting client's liveness probe, listing the ids it still waits for.

    ``owner`` is set by a client's pulse socket, which beats for the client's
    main socket (that identity) while the application holds the thread; the
    broker answers only heartbeats without an owner."""

    request_ids: list = field(default_factory=list)
    owner: bytes | None = None


@dataclass
class Cancel:
    request_ids: list = field(default_factory=list)


@dataclass
class Event:
    """PARTIAL to a client: news about one request."""

    request_id: str
    event: str  # EventKind value
    attempt: int = 1
    detail: str = ""
    glb: bytes | None = None  # with glb_ready
    timings: dict = field(default_factory=dict)
    worker: str = ""


@dataclass
class Result:
    """FINAL to a client: the one result of one request."""

    request_id: str
    ok: bool
    error: dict | None = None  # {"stage", "code", "message"}
    files: dict = field(default_factory=dict)  # SDF package: relative path -> bytes
    sdf_file: str | None = None  # relative path of the .sdf inside files
    info: dict = field(default_factory=dict)  # conversion report (method, mass...)
    timings: dict = field(default_factory=dict)  # queue_wait_s, generate_s, convert_s, total_s
    backend: str = ""
    attempts: int = 1
    cached: bool = False  # answered from the broker's result cache: no worker ran for it


@dataclass
class HealthReply:
    stats: dict


@dataclass
class BrokerHeartbeat:
    """Broker liveness. To a client it also lists request ids it does not know
    (lost in a broker restart) so the client can send them again."""

    broker_id: str
    unknown: list = field(default_factory=list)


# --- messages: broker <-> GPU worker -----------------------------------------


@dataclass
class WorkerReady:
    worker_id: str
    backend: str
    hostname: str = ""
    pid: int = 0
    gpu: str | None = None
    info: dict = field(default_factory=dict)
    heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S  # the broker expires it by this
    model_identity: str = ""  # what its results depend on beside the request (Backend.identity); "": not cached


@dataclass
class Job:
    """REQUEST to a GPU worker."""

    job_id: str
    attempt: int
    backend: str
    input_name: str
    input_data: bytes
    prompt: str | None = None
    backend_options: dict = field(default_factory=dict)  # this request's options, scoped to this backend
    debug: bool = False
    deadline_s: float | None = None  # this attempt may run this long; past it the worker abandons it (FINAL timeout)


@dataclass
class JobProgress:
    job_id: str
    attempt: int
    detail: str = ""


@dataclass
class JobResult:
    job_id: str
    attempt: int
    ok: bool
    glb: bytes | None = None
    error: dict | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    debug_files: dict = field(default_factory=dict)


@dataclass
class WorkerHeartbeat:
    worker_id: str
    job_id: str | None = None  # the job being run, if any
    attempt: int = 0
    loading: bool = False  # its backend is (re)loading: no job until a heartbeat without it


@dataclass
class Disconnect:
    reason: str = ""
    worker_id: str = ""


# --- messages: broker <-> SDF workers ----------------------------------------


@dataclass
class SdfJob:
    """REQUEST pushed to the SDF pool."""

    job_id: str
    attempt: int
    name: str  # output stem
    glb: bytes
    convert: dict = field(default_factory=dict)  # checked conversion options (contract.ConvertOptions fields)


@dataclass
class SdfStatus:
    """READY and HEARTBEAT from an SDF worker: its slots and the jobs it holds."""

    worker_id: str
    slots: int
    free: int
    held: list = field(default_factory=list)  # [[job_id, attempt], ...]
    hostname: str = ""
    pid: int = 0
    heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S  # the broker expires it by this


@dataclass
class SdfResult:
    worker_id: str
    job_id: str
    attempt: int
    ok: bool
    files: dict = field(default_factory=dict)
    sdf_file: str | None = None
    info: dict = field(default_factory=dict)
    error: dict | None = None
    seconds: float = 0.0


# --- channel schemas ---------------------------------------------------------

Schema = dict  # Command -> message dataclass

CLIENT_TO_BROKER: Schema = {
    Command.REQUEST: ClientRequest,
    Command.HEALTH: HealthQuery,
    Command.HEARTBEAT: ClientHeartbeat,
    Command.CANCEL: Cancel,
}
BROKER_TO_CLIENT: Schema = {
    Command.PARTIAL: Event,
    Command.FINAL: Result,
    Command.HEALTH: HealthReply,
    Command.HEARTBEAT: BrokerHeartbeat,
}
WORKER_TO_BROKER: Schema = {
    Command.READY: WorkerReady,
    Command.PARTIAL: JobProgress,
    Command.FINAL: JobResult,
    Command.HEARTBEAT: WorkerHeartbeat,
    Command.DISCONNECT: Disconnect,
}
BROKER_TO_WORKER: Schema = {
    Command.REQUEST: Job,
    Command.HEARTBEAT: BrokerHeartbeat,
    Command.DISCONNECT: Disconnect,
}
BROKER_TO_SDF: Schema = {
    Command.REQUEST: SdfJob,
}
SDF_TO_BROKER: Schema = {
    Command.READY: SdfStatus,
    Command.HEARTBEAT: SdfStatus,
    Command.FINAL: SdfResult,
    Command.DISCONNECT: Disconnect,
}

# Which command each message type is sent with when it is unambiguous.
_DEFAULT_COMMAND: dict[type, Command] = {}
# SdfStatus defaults to READY (first in its schema); its HEARTBEAT is explicit.
for _schema in (CLIENT_TO_BROKER, BROKER_TO_CLIENT, WORKER_TO_BROKER, BROKER_TO_WORKER, BROKER_TO_SDF, SDF_TO_BROKER):
    for _cmd, _cls in _schema.items():
        _DEFAULT_COMMAND.setdefault(_cls, _cmd)


# --- encode / decode ----------------------------------------------------------


def header(command: Command, version: int = VERSION) -> bytes:
    return SIGNATURE + bytes((version, int(command)))


def encode(message: Any, command: Command | None = None) -> list[bytes]:
    """Frames for ``message`` (a dataclass above): ``[header, body]``.

    ``command`` is needed only where one dataclass travels under two commands
    (SdfStatus as READY or HEARTBEAT).
    """
    if command is None:
        try:
            command = _DEFAULT_COMMAND[type(message)]
        except KeyError:
            raise TypeError(f"{type(message).__name__} needs an explicit command") from None
    body = {name: getattr(message, name) for name in _field_names(type(message))}
    return [header(command), msgpack.packb(body, use_bin_type=True)]


def decode(
    frames: list[bytes],
    schema: Schema,
    max_bytes: int = defaults.MAX_MESSAGE_BYTES,
) -> tuple[Command, Any]:
    """Decode two frames (identity already removed) against a channel schema.

    Returns ``(command, message)``. Raises ProtocolError with a sentence fit for
    a log line on anything unexpected: frame count, signature, version,
    command, body size, msgpack, missing fields or wrong types.
    """
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (header, body), got {len(frames)}")
    head, body = bytes(frames[0]), frames[1]
    if len(head) != HEADER_LEN or head[:3] != SIGNATURE:
        raise ProtocolError(f"not a geomgen message (header {head[:8]!r})")
    version, raw_command = head[3], head[4]
    if version != VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported (this side speaks {VERSION})",
            code="bad_version",
        )
    try:
        command = Command(raw_command)
    except ValueError:
        raise ProtocolError(f"unknown command {raw_command}") from None
    cls = schema.get(command)
    if cls is None:
        raise ProtocolError(f"command {command.name} is not valid on this channel")
    # msgpack.unpackb bounds every str/bin/array by len(body), so capping the body
    # caps the decode too.
    if len(body) > max_bytes:
        raise ProtocolError(f"body of {len(body)} bytes exceeds the {max_bytes}-byte limit", code="too_large")
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"body is not valid msgpack: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"body must be a map, got {type(data).__name__}")
    return command, from_dict(cls, data)


def from_dict(cls: type, data: dict) -> Any:
    """Build dataclass ``cls`` from a decoded map, checking each field's type.

    Unknown keys are ignored so a newer peer may add optional fields.
    """
    kwargs = {}
    for spec in _field_specs(cls):
        value = data.get(spec.name, _MISSING)
        if value is _MISSING:
            if spec.required:
                raise ProtocolError(f"{cls.__name__}: missing field {spec.name!r}")
            continue
        if not isinstance(value, spec.types) or (value.__class__ is bool and not spec.allow_bool):
            raise ProtocolError(
                f"{cls.__name__}.{spec.name}: expected {spec.type_name}, got {type(value).__name__}"
            )
        kwargs[spec.name] = value
    return cls(**kwargs)


_MISSING = object()


@dataclass(frozen=True)
class _FieldSpec:
    """A message field's check, compiled once per class (decode is on the hot path)."""

    name: str
    types: tuple  # accepted Python types, for isinstance
    allow_bool: bool  # bool is an int subclass; only a bool field accepts it
    required: bool
    type_name: str


_SPEC_CACHE: dict[type, tuple] = {}
_NAME_CACHE: dict[type, tuple] = {}
_ACCEPT = {
    float: (int, float),
    int: (int,),
    bytes: (bytes, bytearray, memoryview),
    type(None): (type(None),),
}


def _field_specs(cls: type) -> tuple:
    specs = _SPEC_CACHE.get(cls)
    if specs is None:
        hints = typing.get_type_hints(cls)
        compiled = []
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            origin = typing.get_origin(hint)
            options = typing.get_args(hint) if origin is Union or origin is types.UnionType else (hint,)
            accepted: tuple = ()
            for option in options:
                option = typing.get_origin(option) or option
                accepted += _ACCEPT.get(option, (option,))
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
            compiled.append(_FieldSpec(f.name, accepted, bool in options, required, names))
        specs = _SPEC_CACHE[cls] = tuple(compiled)
    return specs


def _field_names(cls: type) -> tuple:
    names = _NAME_CACHE.get(cls)
    if names is None:
        names = _NAME_CACHE[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


# --- routing helpers ------------------------------------------------------------


def split_identity(frames: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Split a ROUTER message into (peer identity, remaining frames)."""
    if len(frames) < 2:
        raise ProtocolError(f"routed message with {len(frames)} frame(s)")
    return bytes(frames[0]), frames[1:]


def error_dict(stage: str, code: str, message: str) -> dict[str, str]:
    """The error map carried by Result, JobResult and SdfResult."""
    stage_value = stage.value if isinstance(stage, enum.Enum) else str(stage)
    return {"stage": stage_value, "code": code, "message": message}
