"""SDFormat writing: one model, one link, its inertial, the glTF visual and one
convex collision per piece, with Drake's contact properties.

Written as SDFormat 1.9 with Drake's XML namespace; every URI is relative to
the .sdf file, so a package can be moved as a folder.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

SDF_VERSION = "1.9"
DRAKE_NS = "http://drake.mit.edu"


def _num(value: float) -> str:
    """Shortest text that reads back as the same float."""
    return repr(float(value))


def sdf_text(
    name: str,
    mass_kg: float,
    com_m: np.ndarray,
    inertia_kg_m2: np.ndarray,
    visual_uri: str,
    collision_uris: list[str],
    mu: float,
    hydroelastic_modulus_pa: float | None = None,
) -> str:
    """The SDFormat document of one rigid object.

    ``com_m`` (3,) and ``inertia_kg_m2`` (3, 3, about the centre of mass) are in
    the +Z-up body frame, like the collision meshes. ``mu`` is written as Drake's
    dynamic and static friction; a ``hydroelastic_modulus_pa`` makes every
    collision compliant-hydroelastic with that modulus.
    """
    ET.register_namespace("drake", DRAKE_NS)
    drake = f"{{{DRAKE_NS}}}"
    sdf = ET.Element("sdf", {"version": SDF_VERSION})
    model = ET.SubElement(sdf, "model", {"name": name})
    link = ET.SubElement(model, "link", {"name": "base_link"})

    inertial = ET.SubElement(link, "inertial")
    # The inertial frame sits at the centre of mass with the body's axes.
    ET.SubElement(inertial, "pose").text = " ".join(_num(c) for c in com_m) + " 0 0 0"
    ET.SubElement(inertial, "mass").text = _num(mass_kg)
    inertia = ET.SubElement(inertial, "inertia")
    for tag, (i, j) in zip(("ixx", "ixy", "ixz", "iyy", "iyz", "izz"), ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))):
        ET.SubElement(inertia, tag).text = _num(inertia_kg_m2[i][j])

    visual = ET.SubElement(link, "visual", {"name": "visual"})
    ET.SubElement(ET.SubElement(ET.SubElement(visual, "geometry"), "mesh"), "uri").text = visual_uri

    for index, uri in enumerate(collision_uris):
        collision = ET.SubElement(link, "collision", {"name": f"collision_{index}"})
        mesh = ET.SubElement(ET.SubElement(collision, "geometry"), "mesh")
        ET.SubElement(mesh, "uri").text = uri
        # The piece is convex already; declaring it lets Drake use it as a Convex shape.
        ET.SubElement(mesh, f"{drake}declare_convex")
        props = ET.SubElement(collision, f"{drake}proximity_properties")
        ET.SubElement(props, f"{drake}mu_dynamic").text = _num(mu)
        ET.SubElement(props, f"{drake}mu_static").text = _num(mu)
        if hydroelastic_modulus_pa is not None:
            ET.SubElement(props, f"{drake}compliant_hydroelastic")
            ET.SubElement(props, f"{drake}hydroelastic_modulus").text = _num(hydroelastic_modulus_pa)
    ET.indent(sdf)
    return "<?xml version='1.0' encoding='utf-8'?>\n" + ET.tostring(sdf, encoding="unicode") + "\n"


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, comment: str = "") -> Path:
    """Write a triangle mesh (vertices (N, 3) metres, faces (M, 3)) as a Wavefront OBJ."""
    lines = [f"# {comment}"] if comment else []
    lines += [f"v {x!r} {y!r} {z!r}" for x, y, z in np.asarray(vertices, dtype=float).tolist()]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in np.asarray(faces, dtype=np.int64).tolist()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
