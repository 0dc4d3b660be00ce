"""MJCF, URDF and USD beside a package's SDF, from the same visual, collision
and inertial data: one +Z-up body frame, the same mass, centre of mass,
inertia and friction in every format.

Called once the SDF package is written. The visual glTF is read back and
written once more as ``<name>_visual.obj`` (+Z up, with UVs), ``.mtl`` and
``<name>_visual.png``, which MuJoCo, URDF loaders and USD all read; the
collision pieces are the package's own ``<name>_collision_<i>.obj``.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geomgen.errors import InputError

EXTRA_FORMATS = ("mjcf", "urdf", "usd")  # what write_formats writes; "sdf" is the package itself


@dataclass
class VisualMesh:
    """The visual as one triangle mesh in the +Z-up body frame: vertices (N, 3)
    metres, faces (M, 3), uv (N, 2) or None, and either a texture file or a
    base colour rgba (4,) in 0..1."""

    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray | None
    texture: Path | None
    rgba: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 1.0)
    obj: Path | None = None  # <name>_visual.obj, once written


@dataclass(frozen=True)
class Body:
    """What every format writes of one rigid body, in the +Z-up body frame:
    the visual, the convex collision pieces (OBJ files beside the output),
    the mass, the centre of mass ``com_m`` (3,) and the inertia
    ``inertia_kg_m2`` (3, 3) about it, and the friction coefficient ``mu``."""

    name: str
    visual: VisualMesh
    collision_files: list[Path]
    mass_kg: float
    com_m: np.ndarray
    inertia_kg_m2: np.ndarray
    mu: float

    def fields(self) -> tuple:
        return (self.name, self.visual, self.collision_files, self.mass_kg, self.com_m, self.inertia_kg_m2, self.mu)


@dataclass
class FormatFiles:
    """What write_formats wrote: ``paths`` maps each format asked for ("mjcf",
    "urdf", "usd") to its main file; ``files`` lists every file written, the
    shared visual OBJ, MTL and PNG included, main files first."""

    paths: dict[str, Path] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def write_formats(
    folder: Path,
    name: str,
    formats: Sequence[str],
    *,
    visual_gltf: Path,
    collision_files: Sequence[Path],
    mass_kg: float,
    com_m: Sequence[float],
    inertia_kg_m2: Sequence[Sequence[float]],
    mu: float,
) -> FormatFiles:
    """Write ``folder/<name>.xml`` (MJCF), ``<name>.urdf`` and ``<name>.usda`` for
    those of "mjcf", "urdf", "usd" in ``formats`` ("sdf" and repeats are ignored).

    ``visual_gltf``: the package's visual ``<name>.gltf`` (+Y up, as write_visual
    wrote it). ``collision_files``: the convex collision OBJ pieces in ``folder``,
    +Z-up body frame. ``com_m`` (3,) and ``inertia_kg_m2`` (3, 3, about the centre
    of mass) in that frame; ``mu``: the friction coefficient. The USD needs the
    ``usd`` extra (``pip install 'geomgen[usd]'``); asking for it without
    raises InputError ``missing_dependency`` before any file is written.
    """
    asked = [f for f in dict.fromkeys(f.lower() for f in formats) if f != "sdf"]
    unknown = [f for f in asked if f not in EXTRA_FORMATS]
    if unknown:
        raise InputError(f"unknown format(s) {', '.join(unknown)}; known: sdf, {', '.join(EXTRA_FORMATS)}", code="bad_option")
    result = FormatFiles()
    if not asked:
        return result
    if "usd" in asked:
        _require_pxr()
    folder = Path(folder)
    com = np.asarray(com_m, dtype=float).reshape(3)
    inertia = np.asarray(inertia_kg_m2, dtype=float).reshape(3, 3)
    collisions = [Path(p) for p in collision_files]
    visual = read_visual(Path(visual_gltf), folder / f"{name}_visual.png")
    shared = write_visual_obj(folder, name, visual)
    body = Body(name, visual, collisions, float(mass_kg), com, inertia, float(mu))

    for fmt in (f for f in EXTRA_FORMATS if f in asked):
        if fmt == "mjcf":
            from geomgen.geometry.mjcf import write_mjcf

            path = write_mjcf(folder / f"{name}.xml", body)
        elif fmt == "urdf":
            from geomgen.geometry.urdf import write_urdf

            path = write_urdf(folder / f"{name}.urdf", body)
        else:
            from geomgen.geometry.usd import write_usd

            path = write_usd(folder / f"{name}.usda", body)
        result.paths[fmt] = path
    result.files = list(result.paths.values()) + shared
    return result


def check_writable(formats: Sequence[str]) -> None:
    """InputError ``missing_dependency`` if a format asked for cannot be written
    in this process (usd without usd-core): checked where a conversion is taken
    on, before any work, not half-way through it."""
    if "usd" in formats:
        _require_pxr()


def _require_pxr() -> None:
    if importlib.util.find_spec("pxr") is None:
        raise InputError(
            "the usd format needs usd-core, which is not installed (pip install 'geomgen[usd]')", code="missing_dependency"
        )


def read_visual(gltf_path: Path, png_path: Path) -> VisualMesh:
    """The visual glTF as one mesh in the +Z-up body frame (its node transforms,
    geomgen's root included, applied); its base-colour texture, if it has one,
    is written to ``png_path``."""
    import trimesh

    from geomgen.geometry.frames import gltf_to_drake

    scene = trimesh.load(str(gltf_path), force="scene")
    meshes = [g for g in scene.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces)]
    if not meshes:
        raise InputError(f"{gltf_path.name} has no triangles to write as a visual", code="bad_mesh")
    # Several textured meshes are packed into one atlas by trimesh; one mesh is kept as it is.
    mesh = meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)
    uv, image, rgba = None, None, (0.8, 0.8, 0.8, 1.0)
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        material = visual.material
        image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
        factor = getattr(material, "baseColorFactor", None)
        if factor is not None:
            rgba = tuple(float(c) / 255.0 for c in np.asarray(factor, dtype=float)[:4])  # trimesh keeps uint8
        if visual.uv is not None and len(visual.uv) == len(mesh.vertices):
            uv = np.asarray(visual.uv, dtype=float)
    elif hasattr(visual, "main_color"):
        rgba = tuple(float(c) / 255.0 for c in visual.main_color[:4])
    if uv is None:
        image = None
    texture = None
    if image is not None:
        # MuJoCo reads PNG only; the other formats read it too.
        texture = png_path
        buffer = io.BytesIO()
        image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB").save(buffer, format="PNG")
        texture.write_bytes(buffer.getvalue())
    return VisualMesh(
        vertices=gltf_to_drake(np.asarray(mesh.vertices, dtype=float)),
        faces=np.asarray(mesh.faces, dtype=np.int64),
        uv=uv,
        texture=texture,
        rgba=rgba,  # type: ignore[arg-type]
    )


def write_visual_obj(folder: Path, name: str, visual: VisualMesh) -> list[Path]:
    """Write ``<name>_visual.obj`` (+Z up, with ``vt`` when there are UVs) and its
    ``.mtl``; sets ``visual.obj``. Returns the files, the texture PNG included."""
    obj = folder / f"{name}_visual.obj"
    mtl = folder / f"{name}_visual.mtl"
    r, g, b, a = visual.rgba
    material = ["newmtl visual", f"Kd {r!r} {g!r} {b!r}", f"d {a!r}", "Ka 0 0 0", "Ks 0 0 0"]
    if visual.texture is not None:
        material[1] = "Kd 1 1 1"
        material.append(f"map_Kd {visual.texture.name}")
    mtl.write_text("\n".join(material) + "\n")
    lines = [f"# {name} visual, +Z up, metres", f"mtllib {mtl.name}", "usemtl visual"]
    lines += [f"v {x!r} {y!r} {z!r}" for x, y, z in visual.vertices.tolist()]
    faces = visual.faces + 1
    if visual.uv is not None:
        lines += [f"vt {u!r} {v!r}" for u, v in visual.uv.tolist()]
        lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in faces.tolist()]
    else:
        lines += [f"f {a} {b} {c}" for a, b, c in faces.tolist()]
    obj.write_text("\n".join(lines) + "\n")
    visual.obj = obj
    return [obj, mtl] + ([visual.texture] if visual.texture is not None else [])


def principal_axes(inertia_kg_m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal moments (3,) kg m^2 and the rotation (3, 3) whose columns are the
    principal axes in the body frame (a proper rotation): I = R diag(d) R^T."""
    moments, axes = np.linalg.eigh(np.asarray(inertia_kg_m2, dtype=float))
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1.0
    return moments, axes


def quat_wxyz(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of a rotation matrix (3, 3)."""
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(rotation).as_quat()
    return np.array([w, x, y, z])


def num(value: float) -> str:
    """Shortest text that reads back as the same float."""
    return repr(float(value))
