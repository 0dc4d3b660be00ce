"""MuJoCo MJCF of one package: a free body with geomgen's inertial, the convex
collision pieces as mesh geoms and the textured visual, in obj2mjcf's two
default classes ("visual": group 2, no contact; "collision": group 3).

The inertial is explicit and inertiafromgeom is off, so MuJoCo uses geomgen's
mass and inertia instead of recomputing them from the meshes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from geomgen.geometry.formats import Body, VisualMesh, num


def mjcf_text(body: Body) -> str:
    """The MJCF document of ``body``; mesh and texture files are named relative to it."""
    name, visual, collision_files, mass_kg, com_m, inertia_kg_m2, mu = body.fields()
    root = ET.Element("mujoco", {"model": name})
    # Explicit inertial only; meshes are read as they are (no recentring to their own COM matters here).
    ET.SubElement(root, "compiler", {"angle": "radian", "inertiafromgeom": "false", "autolimits": "true"})

    default = ET.SubElement(root, "default")
    cls = ET.SubElement(default, "default", {"class": "visual"})
    ET.SubElement(cls, "geom", {"type": "mesh", "group": "2", "contype": "0", "conaffinity": "0", "density": "0"})
    cls = ET.SubElement(default, "default", {"class": "collision"})
    # MuJoCo's friction is (sliding, torsional, rolling); the last two are its defaults.
    ET.SubElement(
        cls,
        "geom",
        {"type": "mesh", "group": "3", "contype": "1", "conaffinity": "1", "density": "0", "friction": f"{num(mu)} 0.005 0.0001"},
    )

    asset = ET.SubElement(root, "asset")
    material = {"name": f"{name}_visual"}
    if visual.texture is not None:
        ET.SubElement(asset, "texture", {"type": "2d", "name": f"{name}_texture", "file": visual.texture.name})
        material["texture"] = f"{name}_texture"
    else:
        material["rgba"] = " ".join(num(c) for c in visual.rgba)
    ET.SubElement(asset, "material", material)
    # inertia="shell": the visual is often open (UV seams), which MuJoCo would refuse as a volume.
    ET.SubElement(asset, "mesh", {"name": f"{name}_visual", "file": _visual_file(name, visual), "inertia": "shell"})
    for index, path in enumerate(collision_files):
        ET.SubElement(asset, "mesh", {"name": f"{name}_collision_{index}", "file": Path(path).name})

    worldbody = ET.SubElement(root, "worldbody")
    body = ET.SubElement(worldbody, "body", {"name": name})
    ET.SubElement(body, "freejoint", {"name": f"{name}_joint"})
    i = np.asarray(inertia_kg_m2, dtype=float)
    ET.SubElement(
        body,
        "inertial",
        {
            "pos": " ".join(num(c) for c in com_m),
            "mass": num(mass_kg),
            "fullinertia": " ".join(num(x) for x in (i[0, 0], i[1, 1], i[2, 2], i[0, 1], i[0, 2], i[1, 2])),
        },
    )
    ET.SubElement(body, "geom", {"name": f"{name}_visual", "class": "visual", "mesh": f"{name}_visual", "material": f"{name}_visual"})
    for index in range(len(collision_files)):
        ET.SubElement(
            body, "geom", {"name": f"{name}_collision_{index}", "class": "collision", "mesh": f"{name}_collision_{index}"}
        )
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _visual_file(name: str, visual: VisualMesh) -> str:
    return visual.obj.name if visual.obj is not None else f"{name}_visual.obj"


def write_mjcf(path: Path, body: Body) -> Path:
    """Write mjcf_text to ``path`` (beside the meshes it names) and return it."""
    Path(path).write_text(mjcf_text(body))
    return Path(path)
