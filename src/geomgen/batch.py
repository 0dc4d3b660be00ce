"""A batch's items: GeometryRequest in, GeometryEvent and GeometryResult out.

Also the client-side half of a request's life that needs no socket: checking
it before anything is sent, and writing what comes back without leaving the
folders it names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from geomgen import contract, defaults
from geomgen.files import replace_dir, resolved_within, staging_dir, write_file
from geomgen.errors import ConvertError, GenerateError, GeomgenError, InputError, TransportError

FINAL = "final"  # GeometryEvent.kind of the one event per item that carries its result
_CONVERT_FIELDS = (
    "mass_kg", "density_kg_m3", "material", "mu", "dimensions", "scale", "collision", "collision_params", "hydroelastic",
    "formats", "height_m",
)
ERROR_BY_STAGE = {"input": InputError, "generate": GenerateError, "convert": ConvertError, "transport": TransportError}


@dataclass
class GeometryRequest:
    """One item of a batch. Field names follow the old geometry server's.

    ``image_path`` is the input file: an image, or a mesh file (GLB, glTF, OBJ,
    PLY, STL) for the ``mesh`` backend. Outputs go to ``<output_dir>/<stem>.glb``
    and ``<output_dir>/<stem>/<stem>.sdf`` (with the package's other files),
    where the stem is ``output_filename`` (checked: letters, digits, ``_ . -``)
    or, by default, the input's stem made valid (``my chair.png`` -> ``my_chair``;
    see contract.sanitize_stem). The SDF fields map onto
    :class:`geomgen.contract.ConvertOptions` (Drake frame, SI units);
    ``convert_options`` passes any other ConvertOptions field. ``sam3d_config``
    (the old API's) travels as the sam3d backend's options.
    """

    image_path: str | os.PathLike
    output_dir: str | os.PathLike
    prompt: str | None = None
    debug_folder: str | os.PathLike | None = None
    output_filename: str | None = None
    backend: str = "auto"
    sam3d_config: dict | None = None
    scene_id: str | None = None
    backend_options: dict = field(default_factory=dict)
    mass_kg: float | None = None
    density_kg_m3: float | None = None
    material: str | None = None
    mu: float | None = None
    dimensions: list[float] | None = None  # target bounding box x, y, z in metres (+Z up)
    scale: float | None = None
    height_m: float | None = None  # uniform scale to this height (metres, +Z), when dimensions and scale are not given
    collision: str = "coacd"
    collision_params: dict = field(default_factory=dict)
    hydroelastic: bool = False
    formats: list[str] = field(default_factory=lambda: ["sdf"])  # simulator formats: sdf, mjcf, urdf, usd
    convert_options: dict = field(default_factory=dict)
    want_sdf: bool = True
    no_worker_timeout_s: float | None = None  # broker's wait for a live worker; None: the broker's default
    deadline_s: float | None = None  # the whole item (queue, generate, convert) within this many seconds, else timeout
    fresh: bool = False  # compute anew even if the broker's result cache holds the result (e.g. another seed)

    def convert_dict(self) -> dict[str, Any]:
        """The checked conversion options of this request as a wire dict; raises InputError."""
        if not isinstance(self.convert_options, dict):
            raise InputError("convert_options must be a map of ConvertOptions fields", code="bad_option")
        data = dict(self.convert_options)
        default = contract.ConvertOptions()
        for name in _CONVERT_FIELDS:
            value = getattr(self, name)
            if value == getattr(default, name):
                continue
            if name in data and data[name] != value:
                raise InputError(f"{name} is given twice with different values (field and convert_options)",
                                 code="bad_option")
            data[name] = list(value) if name == "dimensions" and isinstance(value, tuple) else value
        return contract.convert_options(data).to_dict()


@dataclass
class GeometryResult:
    """The one result of one request: local paths on success, stage and message on failure.

    ``timings`` holds the broker's seconds (queue_wait_s, generate_s, convert_s,
    total_s) plus ``client_s``, send to result as this client saw it.
    """

    index: int
    request: Any
    ok: bool
    glb_path: Path | None = None
    sdf_path: Path | None = None
    package_dir: Path | None = None
    stage: str | None = None  # input | generate | convert | transport
    error_code: str | None = None
    error: str | None = None
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    backend: str = ""
    attempts: int = 0
    cached: bool = False  # served from the broker's result cache: no worker ran for it (attempts is then 0)

    def format_paths(self) -> dict[str, Path]:
        """The package's file for each simulator format written (``sdf``, ``mjcf``,
        ``urdf``, ``usd``), from the conversion report."""
        if self.package_dir is None:
            return {}
        names = self.info.get("formats") if isinstance(self.info.get("formats"), dict) else {}
        paths = {fmt: self.package_dir / rel for fmt, rel in names.items() if isinstance(rel, str)}
        if self.sdf_path is not None:
            paths["sdf"] = self.sdf_path
        return paths

    @property
    def mjcf_path(self) -> Path | None:
        return self.format_paths().get("mjcf")

    @property
    def urdf_path(self) -> Path | None:
        return self.format_paths().get("urdf")

    @property
    def usd_path(self) -> Path | None:
        return self.format_paths().get("usd")

    def raise_for_error(self) -> "GeometryResult":
        """Return self if ok, else raise the geomgen error of its stage."""
        if self.ok:
            return self
        cls = ERROR_BY_STAGE.get(self.stage or "", GeomgenError)
        raise cls(self.error or "the request failed", code=self.error_code, stage=self.stage or None)


@dataclass
class GeometryEvent:
    """News about one item: an EventKind value (queued, generating, progress,
    glb_ready, converting, retrying), or ``final`` with ``result`` set."""

    index: int
    kind: str
    attempt: int = 1
    detail: str = ""
    glb_path: Path | None = None  # with glb_ready: the GLB, already written
    worker: str = ""
    timings: dict = field(default_factory=dict)
    result: GeometryResult | None = None


def final_event(result: GeometryResult) -> GeometryEvent:
    """The ``final`` event that carries ``result``."""
    return GeometryEvent(result.index, FINAL, result.attempts or 1, result=result, timings=result.timings)


def failure(index: int, request: Any, exc: GeomgenError) -> GeometryResult:
    """A failed GeometryResult carrying ``exc``'s stage, code and message."""
    backend = getattr(request, "backend", "")
    return GeometryResult(index=index, request=request, ok=False, stage=exc.stage.value, error_code=exc.code,
                          error=exc.message, backend=backend if isinstance(backend, str) else "")


def read_input(path: Path) -> bytes:
    """The bytes of an input file, at most defaults.MAX_INPUT_BYTES; raises InputError."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InputError(f"input {path} is not a file", code="unreadable")
        if size == 0:
            raise InputError(f"input file {path} is empty", code="empty_input")
        if size > defaults.MAX_INPUT_BYTES:
            raise InputError(f"input file {path} is {size / 2**20:.0f} MiB, over the "
                             f"{defaults.MAX_INPUT_BYTES / 2**20:.0f} MiB limit", code="too_large")
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"input file {path} does not exist", code="missing_file") from None
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror or exc}", code="unreadable") from None


def writable_dir(value: Any, field_name: str) -> Path:
    """Create the folder if needed and prove it writable with a scratch file; raises InputError."""
    if value is None or str(value) == "":
        raise InputError(f"{field_name} is required", code="bad_output_dir")
    path = Path(value).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise InputError(f"{field_name} {path} cannot be written ({exc.strerror or exc}); "
                         "choose a folder you can write to", code="bad_output_dir") from None
    return path


def write_package(root: Path, files: dict, *, replace_folders: bool = False) -> dict[str, Path]:
    """Write ``files`` (relative POSIX path -> bytes) under ``root``; refuse paths leaving it.

    With ``replace_folders`` each top-level folder of ``files`` (an SDF
    package) is built beside and swapped in whole, so no file of an earlier
    package of that name is left in it."""
    targets = {}
    for rel in files:
        parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
        target = resolved_within(root / rel, root) if parts else None
        if (not parts or rel.startswith("/") or "\\" in rel or ".." in parts or "\0" in rel
                or not isinstance(files[rel], (bytes, bytearray)) or target in (None, root.resolve())):
            raise TransportError(f"the broker sent a file path that would leave {root}: {rel!r}; nothing was written",
                                 code="unsafe_path")
        targets[rel] = root / rel
    folders = {PurePosixPath(rel).parts[0] for rel in targets if len(PurePosixPath(rel).parts) > 1}
    staged = {top: staging_dir(root / top) for top in folders} if replace_folders else {}
    try:
        for rel in targets:
            top, *rest = PurePosixPath(rel).parts
            target = staged[top].joinpath(*rest) if top in staged and rest else targets[rel]
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target, bytes(files[rel]))
        for top, staging in staged.items():
            replace_dir(staging, root / top)
    finally:
        for staging in staged.values():
            shutil.rmtree(staging, ignore_errors=True)
    return targets


@dataclass
class CheckedRequest:
    """A request that passed the client-side checks, with its input read."""

    path: Path
    data: bytes
    kind: str  # "image" or "mesh", from the bytes
    stem: str
    output_dir: Path
    convert: dict  # checked conversion options as a wire dict
    backend_options: dict  # as given, with sam3d_config folded in as sam3d.KEY; checked per backend by the client


def check_request(index: int, request: Any) -> CheckedRequest:
    """Check a request's fields, folders and input file before anything is sent.

    Raises InputError naming the field or file: bad types, conversion options
    out of range, an output_filename that is not a plain file stem, folders that
    cannot be written, a missing, unreadable, empty, oversized or unrecognised
    input. The backend's options are checked once the backend is chosen.
    """
    if not isinstance(request, GeometryRequest):
        raise InputError(f"item {index} is a {type(request).__name__}, not a GeometryRequest", code="bad_request")
    for name in ("prompt", "scene_id"):
        contract.check_text(name, getattr(request, name))
    backend_options = contract.with_sam3d_config(request.backend_options, request.sam3d_config)
    if not isinstance(request.want_sdf, bool):
        raise InputError("want_sdf must be true or false", code="bad_request")
    if not isinstance(request.fresh, bool):
        raise InputError("fresh must be true or false", code="bad_request")
    contract.check_seconds("no_worker_timeout_s", request.no_worker_timeout_s)
    contract.check_seconds("deadline_s", request.deadline_s, allow_zero=False)
    convert = request.convert_dict() if request.want_sdf else {}
    path = Path(request.image_path).expanduser()
    stem = contract.output_stem(request.output_filename, path.name)
    output_dir = writable_dir(request.output_dir, "output_dir")
    if request.debug_folder is not None:
        writable_dir(request.debug_folder, "debug_folder")
    data = read_input(path)
    from geomgen.inputs import sniff_kind

    return CheckedRequest(path, data, sniff_kind(path.name, data), stem, output_dir, convert, backend_options)
