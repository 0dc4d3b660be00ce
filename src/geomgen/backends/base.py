"""The small interface every backend implements.

A backend turns one input (an image or a mesh file, as bytes) into one GLB in
geomgen's output conventions: glTF +Y up, metres, resting on y = 0, centred in
x and z. A GPU worker builds one backend instance, calls ``load()`` once before
it announces itself, then ``generate()`` once per job, one job at a time.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from geomgen.errors import InputError


@dataclass
class GenerationInput:
    """One job as a backend sees it."""

    input_name: str  # original file name (its suffix tells the format)
    input_data: bytes
    work_dir: Path  # private scratch folder, removed after the job
    prompt: str | None = None
    options: dict = field(default_factory=dict)  # this request's overrides of backend options, scoped to it
    debug: bool = False
    progress: Callable[[str], None] = lambda detail: None  # report a step to the client


@dataclass
class GenerationOutput:
    glb: bytes  # binary glTF in geomgen's conventions
    info: dict = field(default_factory=dict)  # small facts for the result (faces, seconds per step...)
    debug_files: dict = field(default_factory=dict)  # name -> bytes, written to debug_folder by the client


class Backend(abc.ABC):
    """Base class of backends. Subclasses set the class attributes and implement
    ``generate``; heavy imports belong in ``load`` so that listing backends is cheap.
    """

    name: ClassVar[str]
    input_kind: ClassVar[str] = "image"  # "image" or "mesh"
    uses_gpu: ClassVar[bool] = False
    extra: ClassVar[str | None] = None  # pip extra that provides its dependencies

    def __init__(self, options: dict[str, str] | None = None) -> None:
        """Keep the worker-wide options (``--backend-option key=value``).

        Raise geomgen.errors.InputError for an option that makes no sense.
        """
        self.options = dict(options or {})

    @classmethod
    def check(cls) -> str | None:
        """Why this backend cannot load here (a sentence), or None if it may.

        Must be cheap: no model loading. Used by ``backend=auto`` and ``doctor``.
        """
        return None

    def load(self) -> None:
        """Load models once, before the worker says READY.

        Raise geomgen.errors.BackendUnavailable with a sentence naming what to
        install or download when this cannot work here.
        """

    @abc.abstractmethod
    def generate(self, job: GenerationInput) -> GenerationOutput:
        """Produce the GLB. ``job.options`` hold this request's overrides,
        already scoped to this backend (see scoped_options). Raise InputError
        for a bad input, GenerateError for a failure of the method; any other
        exception is reported as a generate-stage error and the worker serves
        the next job."""

    def close(self) -> None:
        """Release models; called when the worker stops."""


def scoped_options(options: dict[str, Any], backend: str) -> dict[str, Any]:
    """The options meant for ``backend``: plain keys, and ``BACKEND.KEY`` keys
    with this backend's prefix (prefix removed). Keys scoped to another backend
    are left to it, so one batch can carry options for several backends
    (``silhouette.height_m=0.3`` beside ``mesh.unit=mm``)."""
    own: dict[str, Any] = {}
    for key, value in options.items():
        prefix, dot, rest = str(key).partition(".")
        if not dot:
            own[key] = value
        elif prefix == backend:
            own[rest] = value
    return own


def unknown_options_error(backend: str, unknown: list[str], known: tuple[str, ...]) -> InputError:
    """The error for option names a backend does not know, with the scoping hint."""
    return InputError(
        f"unknown {backend} backend option(s) {', '.join(unknown)}; known: {', '.join(known)} "
        f"(to give an option to one backend only, write BACKEND.KEY=VALUE, e.g. silhouette.height_m=0.3)",
        code="bad_option",
    )
