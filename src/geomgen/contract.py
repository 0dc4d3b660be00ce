"""The request contract: every rule a request must meet, stated once.

Output names, backend-option scoping and checking, conversion options with
their physical hints (mass, density, material, dimensions, scale, friction)
and each collision method's parameters. The client, the broker, the HTTP
gateway, the GPU and SDF workers and ``geomgen convert`` all call these
functions at their boundaries, so a request that breaks a rule is refused at
submission with one clear error, before any GPU second is spent.

A leaf module: stdlib, the error tree, option declarations and the materials table.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from geomgen.errors import InputError
from geomgen.geometry.materials import DEFAULT_MU, MATERIALS
from geomgen.optionspec import OptionSpec, parse_options, resolve_options

# --- output names -----------------------------------------------------------------

NAME_MAX_CHARS = 128
# Letters, digits, "_", "." and "-", starting with a letter, digit or "_": a name
# that is safe as a file name, a folder name and a URI in SDFormat, MJCF and URDF
# on every platform, and that no shell or model loader reads as an option.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
FALLBACK_STEM = "model"


def name_problem(name: Any) -> str | None:
    """Why ``name`` is not a valid output stem (a sentence fragment), or None."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    if len(name) > NAME_MAX_CHARS:
        return f"it is longer than {NAME_MAX_CHARS} characters"
    if ".." in name:
        return "it contains '..'"
    if not _NAME.fullmatch(name):
        return ("it may hold only letters, digits, '_', '.' and '-' (ASCII), and must start with a letter, "
                "a digit or '_'")
    return None


def check_output_name(name: Any, field_name: str = "output_filename") -> str:
    """``name`` if it is a valid output stem, else InputError ``bad_name`` saying
    why and suggesting the sanitised name."""
    problem = name_problem(name)
    if problem is None:
        return name
    suggestion = sanitize_stem(name) if isinstance(name, str) else FALLBACK_STEM
    raise InputError(f"{field_name} {name!r} is not a valid output name: {problem}; it names the GLB and the SDF "
                     f"package, so it must be a plain file stem (for example {suggestion!r})", code="bad_name")


def sanitize_stem(text: str) -> str:
    """A valid output stem derived from any text, usually an input file's stem.

    Accents are dropped (``chaise_été`` -> ``chaise_ete``), every other run of
    characters outside ``[A-Za-z0-9_.-]`` becomes one ``_`` (``my chair`` ->
    ``my_chair``), runs of dots shrink to one, leading ``.``/``-`` and trailing
    ``.`` go. A name with nothing left (``椅子``) becomes ``model_<8 hex of its
    sha256>`` so that different inputs keep different names.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", ascii_text)
    stem = re.sub(r"\.{2,}", ".", stem).lstrip(".-").rstrip(".")
    stem = stem[:NAME_MAX_CHARS].rstrip(".")
    if not stem.strip("_") or name_problem(stem):
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return f"{FALLBACK_STEM}_{digest}"
    return stem


def output_stem(output_filename: Any, input_name: str) -> str:
    """The output stem of a request: ``output_filename`` (a trailing ``.glb``
    dropped) checked as given, or, without one, the input file's stem sanitised."""
    if output_filename is None or output_filename == "":
        base = input_name.replace("\\", "/").rsplit("/", 1)[-1]
        stem, dot, _suffix = base.rpartition(".")
        return sanitize_stem(stem if dot and stem else base)
    name = output_filename
    if isinstance(name, str) and name.lower().endswith(".glb"):
        name = name[:-4]
    return check_output_name(name)


# --- backend options ----------------------------------------------------------------

SCOPE_HINT = (" (to give an option to one backend only, write BACKEND.KEY=VALUE, e.g. silhouette.height_m=0.3)")
SAM3D_BACKEND = "sam3d"


def scoped_options(options: Mapping[str, Any], backend: str) -> dict[str, Any]:
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


def check_backend_options(backend: str, specs: Iterable[OptionSpec] | None,
                          options: Mapping[str, Any]) -> dict[str, Any]:
    """This request's options for ``backend`` (scoped, parsed) when the backend
    declares its options (``specs``), else the scoped options unchecked (the
    backend checks them where it runs). InputError ``bad_option``."""
    if not isinstance(options, Mapping):
        raise InputError("backend_options must be a map of option -> value", code="bad_option")
    own = scoped_options(options, backend)
    if specs is None:
        return own
    return parse_options(backend, specs, own, hint=SCOPE_HINT)


def with_sam3d_config(backend_options: Mapping[str, Any], sam3d_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``backend_options`` with the old API's ``sam3d_config`` folded in as the
    sam3d backend's options (``sam3d.KEY``); InputError if a key is given twice
    with different values."""
    if not isinstance(backend_options, Mapping):
        raise InputError("backend_options must be a map of option -> value", code="bad_option")
    merged = dict(backend_options)
    if sam3d_config is None:
        return merged
    if not isinstance(sam3d_config, Mapping):
        raise InputError("sam3d_config must be a map of option -> value, or null", code="bad_option")
    for key, value in sam3d_config.items():
        if value is None:
            continue
        scoped = f"{SAM3D_BACKEND}.{key}"
        if scoped in merged and merged[scoped] != value:
            raise InputError(f"sam3d option {key} is given twice with different values (sam3d_config and "
                             "backend_options)", code="bad_option")
        merged[scoped] = value
    return merged


# --- collision methods and their parameters ------------------------------------------

COLLISION_METHODS = ("coacd", "vhacd", "hull")

# geomgen's CoACD defaults, chosen for speed at unchanged fidelity on the reference
# meshes (see BENCHMARKS.md): a shallower, shorter tree search and a coarser
# concavity sampling than CoACD's own defaults, a fixed seed so a mesh always
# gives the same pieces, and the solid cut into parts of 1,000 faces decomposed
# in parallel, their pieces merged by added volume instead of CoACD's merge.
# Ranges refuse values that make CoACD search forever.
COACD_PARAMS: tuple[OptionSpec, ...] = (
    OptionSpec("threshold", "number", 0.03, 1e-4, 1.0, help="concavity allowed per piece, fraction of the diagonal"),
    OptionSpec("max_convex_hull", "integer", -1, -1, 100_000, help="cap on pieces (-1: no cap); CoACD then merges, on the whole solid"),
    OptionSpec("resolution", "integer", 1000, 10, 1_000_000, help="surface samples for the concavity metric"),
    OptionSpec("mcts_nodes", "integer", 10, 1, 1000, help="children explored per tree-search node"),
    OptionSpec("mcts_iterations", "integer", 60, 1, 100_000, help="tree-search iterations per cut"),
    OptionSpec("mcts_max_depth", "integer", 2, 1, 100, help="cuts looked ahead"),
    OptionSpec("merge", "switch", False,
               help="CoACD's own merge of the pieces within each part (slow; geomgen merges across parts)"),
    OptionSpec("decimate", "switch", False, help="cap each hull at max_ch_vertex vertices"),
    OptionSpec("max_ch_vertex", "integer", 128, 4, 100_000, help="vertices per hull when decimate is on"),
    # Remesh to a manifold first. For a closed solid geomgen passes "off" unless told
    # otherwise: a self-intersection would make "auto" remesh it to ~50,000 faces.
    OptionSpec("preprocess_mode", "choice", "auto", choices=("auto", "on", "off")),
    OptionSpec("preprocess_resolution", "integer", 50, 10, 1000, help="voxel grid of that remeshing"),
    OptionSpec("seed", "integer", 0, 0, 2**31 - 1, help="random seed of the tree search"),
    # geomgen's own, not CoACD's (geometry/coacd_parts.py, geometry/hull_merge.py):
    OptionSpec("part_faces", "integer", 1000, 0, 10_000_000,
               help="cut the solid into parts of at most this many faces, decomposed in parallel (0: whole)"),
    OptionSpec("merge_volume", "number", 0.002, 0.0, 1.0,
               help="merge neighbouring pieces while the volume added stays within this fraction of the solid's"),
)
VHACD_PARAMS: tuple[OptionSpec, ...] = (
    OptionSpec("max_convex_hulls", "integer", 32, 1, 4096, help="cap on pieces"),
    OptionSpec("resolution", "integer", 100_000, 1000, 100_000_000, help="voxels in the volume grid"),
    OptionSpec("max_recursion_depth", "integer", 10, 1, 64, help="splits of a piece at most"),
    OptionSpec("max_num_vertices_per_ch", "integer", 64, 4, 100_000, help="vertices per hull"),
    OptionSpec("min_volume_percent_error", "number", 1.0, 1e-6, 100.0, help="stop splitting below this error, %"),
)
COLLISION_PARAMS: dict[str, tuple[OptionSpec, ...]] = {"coacd": COACD_PARAMS, "vhacd": VHACD_PARAMS, "hull": ()}


def collision_params(method: str, params: Mapping[str, Any] | None, *, resolve: bool = False) -> dict[str, Any]:
    """``params`` checked against ``method``'s declared parameters and normalised;
    with ``resolve`` every parameter, defaults filled in. InputError ``bad_option``."""
    if method not in COLLISION_PARAMS:
        raise InputError(f"collision must be one of {', '.join(COLLISION_METHODS)}, got {method!r}",
                         code="bad_option")
    check = resolve_options if resolve else parse_options
    return check(f"{method} collision", COLLISION_PARAMS[method], params or {})


# --- conversion options and physical hints ---------------------------------------------

@dataclass
class ConvertOptions:
    """How to turn a GLB into a simulation package. Build it with
    :func:`convert_options`, which checks and normalises.

    Frames: ``dimensions`` are x, y, z of the Drake body frame (+Z up), metres.
    Physical hints: ``mass_kg`` sets the mass; ``density_kg_m3`` sets it from the
    volume instead (give one of the two); ``material`` sets whatever of density,
    friction and hydroelastic modulus the other fields leave unset, so
    ``mass_kg=2, material=wood`` is 2 kg with wood's friction. With none of them
    the density is defaults.DENSITY_KG_M3. ``dimensions`` and ``scale`` exclude
    each other.
    """

    up_axis: str = "y"  # up axis of the input mesh: "y" (glTF) or "z" (many CAD/OBJ/STL files)
    mass_kg: float | None = None
    density_kg_m3: float | None = None
    material: str | None = None  # name in geomgen.geometry.materials
    mu: float | None = None  # Coulomb friction; default from the material, else DEFAULT_MU
    dimensions: list[float] | None = None  # target bounding box, uniform scale to fit
    scale: float | None = None  # uniform scale
    height_m: float | None = None  # uniform scale to this height (z extent, Drake frame), metres
    collision: str = "coacd"  # coacd | vhacd | hull
    collision_params: dict = field(default_factory=dict)  # that method's parameters (COLLISION_PARAMS)
    simplify_faces: int | None = None  # decimate to this many faces before decomposition; None: the default budget
    remove_floaters: bool = True  # drop small disconnected pieces
    hydroelastic: bool = False  # write compliant hydroelastic properties
    hydroelastic_modulus_pa: float | None = None  # default from the material
    validate: bool = True  # load the SDF in Drake after writing, when pydrake is installed
    formats: list[str] = field(default_factory=lambda: ["sdf"])  # simulator formats written (FORMATS); sdf always
    preview: bool = True  # render preview.png (visual | collision pieces) into the package, when pydrake is installed

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in field_names()}

    def density(self) -> float | None:
        """The density the hints ask for: density_kg_m3, else the material's, else None."""
        if self.density_kg_m3 is not None:
            return self.density_kg_m3
        return MATERIALS[self.material].density_kg_m3 if self.material else None

    def friction(self) -> float:
        """Coulomb friction: mu, else the material's, else DEFAULT_MU."""
        if self.mu is not None:
            return self.mu
        return MATERIALS[self.material].mu if self.material else DEFAULT_MU


@functools.cache
def field_names() -> tuple[str, ...]:
    """ConvertOptions' field names, looked up once (the broker checks options per request)."""
    return tuple(f.name for f in dataclasses.fields(ConvertOptions))


def convert_options(data: Mapping[str, Any] | ConvertOptions | None) -> ConvertOptions:
    """Conversion options from a request's map (or an existing object), checked
    and normalised: numbers as floats, dimensions as a list, collision
    parameters parsed against their method. InputError ``bad_option`` naming
    the field."""
    if isinstance(data, ConvertOptions):
        data = data.to_dict()
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError("conversion options must be a map of option -> value", code="bad_option")
    unknown = sorted(str(k) for k in set(data) - set(field_names()))
    if unknown:
        raise InputError(f"unknown conversion option(s) {', '.join(unknown)}; known: {', '.join(field_names())}",
                         code="bad_option")
    values = {k: v for k, v in data.items()}
    for name in ("mass_kg", "density_kg_m3", "scale", "height_m", "hydroelastic_modulus_pa"):
        values[name] = _positive(name, values.get(name))
    values["mu"] = _friction(values.get("mu"))
    values["dimensions"] = _dimensions(values.get("dimensions"))
    if values.get("up_axis", "y") not in ("y", "z"):
        raise InputError(f"up_axis must be 'y' or 'z', got {values['up_axis']!r}", code="bad_option")
    collision = values.get("collision", "coacd")
    if not isinstance(collision, str) or collision not in COLLISION_METHODS:
        raise InputError(f"collision must be one of {', '.join(COLLISION_METHODS)}, got {collision!r}",
                         code="bad_option")
    values["collision_params"] = collision_params(collision, values.get("collision_params"))
    faces = values.get("simplify_faces")
    if faces is not None and (not isinstance(faces, int) or isinstance(faces, bool) or faces < 4):
        raise InputError(f"simplify_faces must be an integer >= 4, got {faces!r}", code="bad_option")
    material = values.get("material")
    if material is not None and (not isinstance(material, str) or material not in MATERIALS):
        raise InputError(f"unknown material {material!r}; known: {', '.join(sorted(MATERIALS))}", code="bad_option")
    for name in ("remove_floaters", "hydroelastic", "validate", "preview"):
        if name in values and not isinstance(values[name], bool):
            raise InputError(f"{name} must be true or false, got {values[name]!r}", code="bad_option")
    values["formats"] = check_formats(values.get("formats", ["sdf"]))
    _check_hints(values)
    return ConvertOptions(**values)


FORMATS = ("sdf", "mjcf", "urdf", "usd")  # Drake SDFormat, MuJoCo MJCF, URDF, OpenUSD (Isaac)


def check_formats(value: Any) -> list[str]:
    """The simulator formats asked for, in FORMATS order, ``sdf`` always among
    them (the others are written from the same package). InputError ``bad_option``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InputError(f"formats must be a list of {', '.join(FORMATS)}, got {value!r}", code="bad_option")
    unknown = sorted({v.lower() for v in value} - set(FORMATS))
    if unknown:
        raise InputError(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}", code="bad_option")
    asked = {v.lower() for v in value} | {"sdf"}
    return [f for f in FORMATS if f in asked]


def _check_hints(values: dict[str, Any]) -> None:
    """Physical hints that contradict each other are refused rather than one silently ignored."""
    if values.get("mass_kg") is not None and values.get("density_kg_m3") is not None:
        raise InputError("give mass_kg or density_kg_m3, not both: the density only serves to compute the mass "
                         "(a material may go with either: it sets the friction, and the density when no mass "
                         "is given)", code="bad_option")
    sizes = [name for name in ("dimensions", "scale", "height_m") if values.get(name) is not None]
    if len(sizes) > 1:
        raise InputError(f"give one of dimensions, scale and height_m, not {' and '.join(sizes)}: each sets the "
                         "object's size", code="bad_option")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value!r}", code="bad_option")
    return float(value)


def _friction(value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise InputError(f"mu must be a finite number >= 0, got {value!r}", code="bad_option")
    return float(value)


def _dimensions(value: Any) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise InputError(f"dimensions must be three numbers x y z in metres, got {value!r}", code="bad_option")
    return [_positive("dimensions", d) for d in value]


# --- the request as a whole ---------------------------------------------------------------


def check_seconds(name: str, value: Any, *, allow_zero: bool = True) -> float | None:
    """A duration field: None, or a finite number of seconds (> 0, or >= 0 with ``allow_zero``)."""
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InputError(f"{name} must be a number of seconds {bound}, got {value!r}", code="bad_request")
    return float(value)


def check_text(name: str, value: Any) -> str | None:
    """A free-text field (prompt, scene_id): a string or None."""
    if value is not None and not isinstance(value, str):
        raise InputError(f"{name} must be a string or null, got {type(value).__name__}", code="bad_request")
    return value
