"""One exception tree for geomgen.

Every error that reaches a user carries the pipeline stage it happened in and a
sentence the user can act on; `code` is a short machine-readable tag.
"""

from __future__ import annotations

import enum


class Stage(str, enum.Enum):
    """Where in the pipeline an item failed."""

    INPUT = "input"  # the request itself: files, fields, options
    GENERATE = "generate"  # the backend turning the input into a GLB
    CONVERT = "convert"  # GLB -> Drake SDF package
    TRANSPORT = "transport"  # sockets, brokers, lost workers, timeouts


class GeomgenError(Exception):
    """Base of every geomgen error.

    Attributes:
        stage: pipeline stage the error belongs to.
        code: short tag such as ``bad_image`` or ``worker_lost``.
        message: one sentence a user can act on.
    """

    default_stage = Stage.INPUT
    default_code = "error"

    def __init__(self, message: str, *, code: str | None = None, stage: Stage | str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.stage = Stage(stage) if stage is not None else self.default_stage

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str]:
        return {"stage": self.stage.value, "code": self.code, "message": self.message}


class InputError(GeomgenError):
    """The request or one of its files is unusable (stage ``input``)."""

    default_stage = Stage.INPUT
    default_code = "bad_input"


class GenerateError(GeomgenError):
    """A backend failed to produce a GLB (stage ``generate``)."""

    default_stage = Stage.GENERATE
    default_code = "generate_failed"


class ConvertError(GeomgenError):
    """GLB -> SDF conversion failed (stage ``convert``)."""

    default_stage = Stage.CONVERT
    default_code = "convert_failed"


class TransportError(GeomgenError):
    """Sockets, timeouts, lost workers or brokers (stage ``transport``)."""

    default_stage = Stage.TRANSPORT
    default_code = "transport"


class ProtocolError(TransportError):
    """A peer sent frames or a body this protocol version cannot decode."""

    default_code = "protocol"


class BackendUnavailable(GeomgenError):
    """A backend cannot be loaded here (missing extra, weights, GPU...).

    Raised at worker start-up, before READY, so a worker that cannot serve never
    registers with the broker.
    """

    default_stage = Stage.GENERATE
    default_code = "backend_unavailable"


class UnknownBackend(InputError):
    """No backend of that name is registered."""

    default_code = "unknown_backend"
