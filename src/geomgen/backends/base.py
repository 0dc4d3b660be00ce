"""The small interface every backend implements.

A backend turns one input (an image or a mesh file, as bytes) into one GLB in
geomgen's output conventions: glTF +Y up, metres, resting on y = 0, centred in
x and z. A GPU worker builds one backend instance, calls ``load()`` once before
it announces itself, then ``generate()`` once per job, one job at a time.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from geomgen import __version__, defaults
from geomgen.contract import SCOPE_HINT, scoped_options
from geomgen.optionspec import OptionSpec, resolve_options


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
    # The options it takes, declared: the client and the broker refuse a request
    # whose options are misspelt or out of range before it is queued. None: not
    # declared (a plug-in's choice); such options are checked only by generate().
    options_spec: ClassVar[tuple[OptionSpec, ...] | None] = None
    # How long one generate() may run before the worker kills the backend
    # process and reloads it, seconds (``gpu-worker --generate-timeout`` overrides).
    generate_timeout_s: ClassVar[float] = defaults.CPU_GENERATE_TIMEOUT_S

    def __init__(self, options: dict[str, str] | None = None) -> None:
        """Keep the worker-wide options (``--backend-option key=value``),
        checked against ``options_spec`` when declared.

        Raise geomgen.errors.InputError for an option that makes no sense.
        """
        # Scoped here too, so a backend built with one batch's options for several
        # backends (silhouette.height_m beside mesh.unit) takes only its own.
        self.options = scoped_options(dict(options or {}), getattr(self, "name", ""))
        if self.options_spec is not None:
            self.resolve_options(self.options)  # a bad worker-wide option fails at start

    @classmethod
    def resolve_options(cls, worker_options: dict, request_options: dict | None = None) -> dict:
        """Every declared option: the request's value, else the worker's, else
        the default; InputError ``bad_option`` naming a bad one. Only for
        backends that declare ``options_spec``."""
        if cls.options_spec is None:
            raise TypeError(f"backend {cls.name!r} declares no options_spec")
        merged = {**scoped_options(worker_options, cls.name), **scoped_options(request_options or {}, cls.name)}
        return resolve_options(cls.name, cls.options_spec, merged, hint=SCOPE_HINT)

    @classmethod
    def check(cls) -> str | None:
        """Why this backend cannot load here (a sentence), or None if it may.

        Must be cheap: no model loading. Used by ``backend=auto`` and ``doctor``.
        """
        return None

    def identity(self) -> str:
        """What this backend's results depend on beside the request, for the
        broker's result cache (called once, after ``load``): two workers with
        the same identity must turn the same request into the same GLB.

        The default is the backend's name, geomgen's version and the
        worker-wide options, right for a backend without weights. A backend
        with weights adds what names them (a file's hash, or a model's name and
        version). Return "" to keep this backend's results out of the cache.
        """
        options = json.dumps(self.options, sort_keys=True, default=repr)
        return f"{self.name} geomgen {__version__} options {options}"

    def load(self) -> None:
        """Load models once, before the worker says READY.

        Raise geomgen.errors.BackendUnavailable with a sentence naming what to
        install or download when this cannot work here.
        """

    @abc.abstractmethod
    def generate(self, job: GenerationInput) -> GenerationOutput:
        """Produce the GLB. ``job.options`` hold this request's overrides,
        already scoped to this backend (contract.scoped_options). Raise InputError
        for a bad input, GenerateError for a failure of the method; any other
        exception is reported as a generate-stage error and the worker serves
        the next job."""

    def close(self) -> None:
        """Release models; called when the worker stops."""
