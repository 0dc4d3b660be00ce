"""Image and mesh steps of the hunyuan3d backend that need no model: alpha
coverage, hy3dgen's clean-up chain in pymeshlab, and the GLB export."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from geomgen.errors import GenerateError

if TYPE_CHECKING:
    import PIL.Image
    import trimesh

CUTOUT_MIN_TRANSPARENT = 0.01  # share of see-through pixels (alpha < 128) that makes the alpha channel a cut-out


def alpha_coverage(image: "PIL.Image.Image") -> str:
    """"cutout" when the alpha channel separates an object from a see-through
    background, "opaque" when it hides nothing, "empty" when it hides everything."""
    alpha = np.asarray(image.getchannel("A"))
    solid = alpha >= 128
    if not solid.any():
        return "empty"
    return "cutout" if 1.0 - solid.mean() >= CUTOUT_MIN_TRANSPARENT else "opaque"


def clean_mesh(mesh: "trimesh.Trimesh", max_faces: int) -> "trimesh.Trimesh":
    """Drop floaters and degenerate faces, then decimate to ``max_faces`` (hy3dgen's
    FloaterRemover and FaceReducer). The mesh stays in pymeshlab between steps:
    hy3dgen's trimesh round trips leave temporary PLY files behind."""
    import pymeshlab
    import trimesh
    from hy3dgen.shapegen import FaceReducer, FloaterRemover

    meshset = pymeshlab.MeshSet()
    meshset.add_mesh(pymeshlab.Mesh(vertex_matrix=np.asarray(mesh.vertices, dtype=np.float64),
                                    face_matrix=np.asarray(mesh.faces, dtype=np.int32)))
    meshset = FloaterRemover()(meshset)
    # DegenerateFaceRemover is a PLY save/reload through a temp file it never
    # deletes; these filters do the same clean-up in memory.
    for name in ("meshing_remove_duplicate_vertices", "meshing_remove_null_faces",
                 "meshing_remove_duplicate_faces", "meshing_remove_unreferenced_vertices"):
        meshset.apply_filter(name)
    meshset = FaceReducer()(meshset, max_facenum=max_faces)
    current = meshset.current_mesh()
    cleaned = trimesh.Trimesh(vertices=current.vertex_matrix(), faces=current.face_matrix(), process=False)
    if len(cleaned.faces) == 0:
        raise GenerateError("mesh clean-up left no faces (the generated shape was only small fragments)",
                            code="no_surface")
    return cleaned


def export_glb_bytes(mesh: "trimesh.Trimesh") -> tuple[bytes, np.ndarray]:
    """GLB bytes in geomgen's conventions and the extent, shape (3,), metres."""
    import trimesh

    from geomgen.geometry.meshio import export_glb, scene_bounds, to_output_conventions

    # Hunyuan3D-2 meshes are already +Y up (glTF's convention), front towards +Z.
    scene = to_output_conventions(trimesh.Scene(mesh), up_axis="y")
    bounds = scene_bounds(scene)
    return export_glb(scene), bounds[1] - bounds[0]


def png_bytes(image: "PIL.Image.Image") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
