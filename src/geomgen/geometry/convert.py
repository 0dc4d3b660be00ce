"""GLB (or any mesh geomgen reads) -> Drake SDFormat package: the public entry
points of the conversion, used by the SDF worker and by ``geomgen convert``.

A package is ``<out_dir>/<name>/``: ``<name>.sdf``, the visual ``<name>.gltf``
with its buffer and textures, ``<name>_collision_<i>.obj`` in the +Z-up body
frame, and a ``<name>.json`` manifest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np

import geomgen
from geomgen.errors import ConvertError, GeomgenError, InputError
from geomgen.files import replace_dir
from geomgen.geometry import materials
from geomgen.geometry.coacd_parts import workers_ahead
from geomgen.geometry.decomposition import decompose, processes_ahead
from geomgen.geometry.formats import write_formats
from geomgen.geometry.frames import apply_transform, gltf_to_drake, input_transform
from geomgen.geometry.inertia import check_not_flat, mass_properties
from geomgen.geometry.preview import PREVIEW_FILE, write_preview
from geomgen.contract import ConvertOptions, check_output_name, convert_options, sanitize_stem
from geomgen.geometry.repair import make_solid, scene_triangles
from geomgen.geometry.sdf import SDF_VERSION, sdf_text, write_obj
from geomgen.geometry.visual import pack_gltf, write_visual
from geomgen.inputs import local_reference

@dataclass
class ConversionReport:
    """What a conversion produced. Frames: Drake body frame (+Z up), SI units.

    com_m (3,), inertia_kg_m2 (3, 3) about the centre of mass, bbox_m: the
    extents x, y, z of the visual mesh in the body frame. method: the
    decomposition that made the collision pieces; fallbacks: why the methods
    tried before it failed. inertia_source: "mesh", "collision_union" or "voxel_fill".
    """

    name: str
    package_dir: Path
    sdf_path: Path
    files: list[Path]
    method: str
    fallbacks: list[str]
    pieces: int
    mass_kg: float
    volume_m3: float
    density_kg_m3: float
    com_m: list[float]
    inertia_kg_m2: list[list[float]]
    bbox_m: list[float]
    inertia_source: str
    mu: float
    watertight: bool
    validated: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # simulator format -> its file in the package
    preview: str | None = None  # the package's preview image (visual | collision), None when not rendered
    # Each simulator's check of the package: {"drake": {"status": "passed" | "skipped" | "failed", "detail": ...}}
    checks: dict[str, dict] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)  # seconds per stage (load, repair, decompose...)

    def to_dict(self) -> dict:
        """JSON-safe form; paths are relative to package_dir (which is left out)."""
        data = asdict(self)
        data.pop("package_dir")
        data["sdf_path"] = self.sdf_path.name
        data["files"] = [str(p.relative_to(self.package_dir)) for p in self.files]
        return data


def convert_mesh(
    data: bytes, input_name: str, out_dir: Path, name: str, options: ConvertOptions | None = None
) -> ConversionReport:
    """Convert one mesh file's bytes into the package ``out_dir/<name>/``.

    ``input_name`` is the file's name (its suffix tells the format: GLB, glTF
    with embedded data, OBJ, PLY, STL). An existing package of that name is
    replaced only once the new one is complete. Raises InputError for unusable
    input (codes bad_mesh, zero_volume, bad_option, bad_name...) and
    ConvertError for conversion failures (decomposition_failed, drake_rejected...).
    """
    sources = [{"name": input_name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}]
    return _convert(data, input_name, Path(out_dir), name, options, sources)


def convert_file(path: Path, out_dir: Path, options: ConvertOptions | None = None, name: str | None = None) -> ConversionReport:
    """Convert the mesh file at ``path`` into ``out_dir/<name>/`` (name: the file's stem, made safe).

    A .gltf may reference buffers and images beside it. Errors as convert_mesh.
    """
    path = Path(path)
    name = sanitize_stem(path.stem) if name is None else name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}", code="unreadable_input") from None
    sources = [{"name": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}]
    suffix = path.suffix.lower()
    if suffix == ".gltf":
        # A .gltf's buffers and textures live beside it: pack them, byte for byte, into one GLB.
        glb = pack_gltf(data, path.parent)
        sources += _gltf_resources(data, path.parent)
        return _convert(glb, path.stem + ".glb", Path(out_dir), name, options, sources)
    if suffix == ".obj" and b"mtllib" in data:
        # Its materials and textures are files beside it, which only a load from disk finds.
        from geomgen.geometry.meshio import export_glb, load_mesh_file

        try:
            glb = export_glb(load_mesh_file(path))
        except GeomgenError as exc:
            if isinstance(exc, InputError):
                raise
            raise ConvertError(f"{path.name}: {exc.message}", code="bad_visual") from None
        return _convert(glb, path.stem + ".glb", Path(out_dir), name, options, sources)
    return _convert(data, path.name, Path(out_dir), name, options, sources)


def _gltf_resources(gltf: bytes, folder: Path) -> list[dict]:
    """Hashes of the external files a .gltf references (pack_gltf has read them, inside ``folder``)."""
    try:
        tree = json.loads(gltf.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return []
    found = []
    for entry in (tree.get("buffers") or []) + (tree.get("images") or []):
        uri = entry.get("uri") if isinstance(entry, dict) else None
        if not isinstance(uri, str) or uri.startswith("data:"):
            continue
        path = local_reference(folder, unquote(uri), f"{uri!r}")
        if path.is_file():
            blob = path.read_bytes()
            found.append({"name": uri, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)})
    return found


def _convert(
    data: bytes, input_name: str, out_dir: Path, name: str, options: ConvertOptions | dict | None, sources: list[dict]
) -> ConversionReport:
    start = time.monotonic()
    check_output_name(name, "output name")
    if not isinstance(options, ConvertOptions):
        options = convert_options(options)  # a request's wire form
    staging = out_dir / f".{name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        # CoACD's worker processes start now and import while the mesh loads.
        with workers_ahead(processes_ahead(options.collision, options.collision_params)):
            report = _build(data, input_name, staging, name, options, sources, start)
        final = out_dir / name
        replace_dir(staging, final)
    except GeomgenError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConvertError(f"cannot write the package under {out_dir}: {exc.strerror or exc}", code="write_failed") from None
    except Exception as exc:  # a library failing on an input we did not foresee: this job fails, clearly
        shutil.rmtree(staging, ignore_errors=True)
        raise ConvertError(f"converting {input_name} failed ({type(exc).__name__}: {exc})", code="convert_failed") from exc
    report.package_dir = final
    report.sdf_path = final / report.sdf_path.name
    report.files = [final / p.relative_to(staging) for p in report.files]
    return report


def _build(
    data: bytes, input_name: str, folder: Path, name: str, options: ConvertOptions, sources: list[dict], start: float
) -> ConversionReport:
    from geomgen.geometry.meshio import export_glb, load_mesh

    stages = _Stages(start)
    scene = load_mesh(data, input_name)
    warnings = [str(w) for w in scene.metadata.get("warnings", [])]
    if data[:4] == b"glTF":
        glb = data
    else:
        try:
            glb = export_glb(scene)
        except GeomgenError as exc:
            raise ConvertError(f"{input_name}: {exc.message}", code="bad_visual") from None

    vertices, faces = scene_triangles(scene)
    stages.mark("load")
    transform, notes = input_transform(vertices, options.up_axis, options.dimensions, options.scale, options.height_m)
    warnings += notes
    visual_drake = gltf_to_drake(apply_transform(vertices, transform))
    check_not_flat(visual_drake)
    solid = make_solid(apply_transform(vertices, transform), faces, options.remove_floaters)
    warnings += solid.warnings
    solid_drake = gltf_to_drake(solid.vertices)
    check_not_flat(solid_drake)
    stages.mark("repair")

    pieces = decompose(
        solid_drake,
        solid.faces,
        method=options.collision,
        params=options.collision_params,
        simplify_faces=options.simplify_faces,
    )
    warnings += pieces.warnings
    if pieces.fallbacks:
        warnings.append(f"collision pieces made by {pieces.method} after: " + "; ".join(pieces.fallbacks))
    stages.mark("decompose", part={"simplify": pieces.simplify_s})

    material = materials.MATERIALS.get(options.material) if options.material else None
    props = mass_properties(solid_drake, solid.faces, solid.watertight, pieces.pieces, options.mass_kg,
                            options.density())
    warnings += props.warnings
    stages.mark("mass")
    mu = options.friction()
    modulus = None
    if options.hydroelastic:
        modulus = options.hydroelastic_modulus_pa or (
            material.hydroelastic_modulus_pa if material else materials.DEFAULT_HYDROELASTIC_MODULUS_PA
        )

    files = write_visual(glb, folder, name, transform)
    stages.mark("visual")
    collision_uris = []
    for index, (piece_vertices, piece_faces) in enumerate(pieces.pieces):
        path = write_obj(
            folder / f"{name}_collision_{index}.obj", piece_vertices, piece_faces, f"{name} collision piece {index}, +Z up, metres"
        )
        files.append(path)
        collision_uris.append(path.name)
    sdf_path = folder / f"{name}.sdf"
    sdf_path.write_text(
        sdf_text(name, props.mass_kg, props.com_m, props.inertia_kg_m2, files[0].name, collision_uris, mu, modulus)
    )
    files.insert(0, sdf_path)
    stages.mark("sdf")
    visual_gltf = files[1]  # write_visual's .gltf comes first of its files
    extra = write_formats(folder, name, options.formats, visual_gltf=visual_gltf,
                          collision_files=[folder / uri for uri in collision_uris], mass_kg=props.mass_kg,
                          com_m=props.com_m, inertia_kg_m2=props.inertia_kg_m2, mu=mu)
    files[1:1] = extra.files
    formats = {"sdf": sdf_path.name, **{fmt: path.name for fmt, path in extra.paths.items()}}
    warnings += plausibility_warnings(visual_drake, props.mass_kg, options)
    stages.mark("formats")

    checks = {"drake": _validate(sdf_path, options, warnings)}
    stages.mark("drake_check")
    if "mjcf" in extra.paths:
        checks["mujoco"] = _check_mujoco(extra.paths["mjcf"], props.mass_kg, warnings)
        stages.mark("mujoco_check")
    bounds = np.array([visual_drake.min(axis=0), visual_drake.max(axis=0)])
    preview = None
    if options.preview:
        preview = _preview(folder / PREVIEW_FILE, visual_gltf, [folder / uri for uri in collision_uris], bounds,
                           warnings)
        stages.mark("preview")
    if preview is not None:
        files.append(preview)
    report = ConversionReport(
        name=name,
        package_dir=folder,
        sdf_path=sdf_path,
        files=files,
        method=pieces.method,
        fallbacks=list(pieces.fallbacks),
        pieces=len(pieces.pieces),
        mass_kg=props.mass_kg,
        volume_m3=props.volume_m3,
        density_kg_m3=props.density_kg_m3,
        com_m=[float(c) for c in props.com_m],
        inertia_kg_m2=[[float(x) for x in row] for row in props.inertia_kg_m2],
        bbox_m=[float(e) for e in bounds[1] - bounds[0]],
        inertia_source=props.source,
        mu=float(mu),
        watertight=solid.watertight,
        validated=checks["drake"]["status"] == "passed",
        seconds=0.0,
        warnings=warnings,
        formats=formats,
        preview=None if preview is None else preview.name,
        checks=checks,
        stage_s=stages.seconds,
    )
    manifest_path = folder / f"{name}.json"
    files.append(manifest_path)
    report.seconds = time.monotonic() - start
    manifest = {
        "geomgen_version": geomgen.__version__,
        "sdf_version": SDF_VERSION,
        "inputs": sources,
        "options": options.to_dict(),
        "collision_params": pieces.params,
        "decomposition_faces": pieces.faces_in,
        "hydroelastic_modulus_pa": modulus,
        "bounds_m": bounds.tolist(),
        **report.to_dict(),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return report


# An object outside these is more likely a mistake (no size given, the wrong unit) than a real one.
PLAUSIBLE_SIZE_M = (0.005, 10.0)  # largest extent of the bounding box, metres
PLAUSIBLE_MASS_KG = 100.0  # a mass computed from a density above this is flagged


def plausibility_warnings(vertices_m: np.ndarray, mass_kg: float, options: ConvertOptions) -> list[str]:
    """Sentences for a size or a computed mass a person should look at twice:
    ``vertices_m`` (N, 3) in the body frame, metres."""
    out = []
    largest = float(np.ptp(np.asarray(vertices_m, dtype=float), axis=0).max())
    low, high = PLAUSIBLE_SIZE_M
    sized = options.dimensions is not None or options.scale is not None or options.height_m is not None
    if not low <= largest <= high:
        out.append(f"the object is {largest:.3g} m across, outside {low:g} to {high:g} m: check its unit"
                   + ("" if sized else ", or give its size (dimensions, scale, or --height for an image)"))
    if options.mass_kg is None and mass_kg > PLAUSIBLE_MASS_KG:
        source = f"the {options.material} density" if options.material else "its density"
        out.append(f"{mass_kg:.4g} kg from {source} and a size of {largest:.3g} m; if that is not its real weight, "
                   "give mass_kg or its size")
    return out


class _Stages:
    """Seconds spent in each stage of one conversion, in the order they ran."""

    def __init__(self, start_s: float):
        self.seconds: dict[str, float] = {}
        self._last_s = start_s

    def mark(self, stage: str, part: dict[str, float] | None = None) -> None:
        """``stage`` ended now: it took the time since the previous mark, less
        the seconds of the sub-stages in ``part``, which are recorded apart."""
        now_s = time.monotonic()
        spent_s = now_s - self._last_s
        for sub, sub_s in (part or {}).items():
            self.seconds[sub] = round(self.seconds.get(sub, 0.0) + sub_s, 4)
            spent_s -= sub_s
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + spent_s, 4)
        self._last_s = now_s


def _check(status: str, detail: str) -> dict:
    return {"status": status, "detail": detail}


def _validate(sdf_path: Path, options: ConvertOptions, warnings: list[str]) -> dict:
    """Load the package in Drake when asked and possible (a check, see _check);
    ConvertError if Drake rejects it."""
    if not options.validate:
        return _check("skipped", "validate is off")
    if importlib.util.find_spec("pydrake") is None:
        warnings.append("not checked in Drake: pydrake is not installed (pip install 'geomgen[drake]')")
        return _check("skipped", "pydrake is not installed")
    from geomgen.geometry.drake_check import validate_sdf

    validate_sdf(sdf_path)
    return _check("passed", "parsed into a MultibodyPlant; spatial inertia valid")


def _check_mujoco(mjcf_path: Path, mass_kg: float, warnings: list[str]) -> dict:
    """Load the package's MJCF in MuJoCo, when installed, and compare its mass.
    A failure is a warning (the SDF, Drake's, is still good), never the job's."""
    if importlib.util.find_spec("mujoco") is None:
        return _check("skipped", "mujoco is not installed (pip install mujoco)")
    import mujoco

    try:
        model = mujoco.MjModel.from_xml_path(str(mjcf_path))
    except Exception as exc:  # noqa: BLE001 - MuJoCo's message is the finding
        detail = " ".join(str(exc).split())
        warnings.append(f"MuJoCo cannot load {mjcf_path.name}: {detail}")
        return _check("failed", detail)
    loaded_kg = float(model.body_mass[1:].sum())
    if not np.isclose(loaded_kg, mass_kg, rtol=1e-6):
        warnings.append(f"MuJoCo reads a mass of {loaded_kg:.6g} kg from {mjcf_path.name}, not {mass_kg:.6g} kg")
        return _check("failed", f"mass {loaded_kg:.6g} kg, expected {mass_kg:.6g} kg")
    return _check("passed", f"loaded; mass {loaded_kg:.6g} kg")


def _preview(path: Path, visual_path: Path, collision_paths: list[Path], bounds_m: np.ndarray,
             warnings: list[str]) -> Path | None:
    """``preview.png`` (geometry.preview), or None with a warning: a package
    without a preview is still a good package."""
    if importlib.util.find_spec("pydrake") is None:
        warnings.append("no preview.png: its renderer, pydrake, is not installed (pip install 'geomgen[drake]')")
        return None
    try:
        return write_preview(path, visual_path, collision_paths, bounds_m)
    except Exception as exc:  # noqa: BLE001 - a renderer failure costs the picture, never the package
        path.unlink(missing_ok=True)
        warnings.append(f"no preview.png: rendering failed ({type(exc).__name__}: {' '.join(str(exc).split())})")
        return None
