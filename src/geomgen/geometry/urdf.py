"""URDF of one package: one link, its inertial at the centre of mass, the visual
OBJ and the convex collision OBJ pieces, all in the +Z-up link frame.

URDF has no friction; it is written where the loaders that read one look:
Drake's ``drake:proximity_properties`` on each collision and Gazebo's
``<gazebo><mu1/><mu2/>``. Mesh filenames are relative to the .urdf file.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from geomgen.geometry.formats import Body, num
from geomgen.geometry.sdf import DRAKE_NS

LINK = "base_link"


def urdf_text(body: Body) -> str:
    """The URDF document. ``com_m`` (3,), ``inertia_kg_m2`` (3, 3) about the COM,
    axes of the link frame (+Z up), as URDF's ``<inertial><origin>`` means them."""
    name, visual, collision_files, mass_kg, com_m, inertia_kg_m2, mu = body.fields()
    ET.register_namespace("drake", DRAKE_NS)
    drake = f"{{{DRAKE_NS}}}"
    robot = ET.Element("robot", {"name": name})
    link = ET.SubElement(robot, "link", {"name": LINK})

    inertial = ET.SubElement(link, "inertial")
    ET.SubElement(inertial, "origin", {"xyz": " ".join(num(c) for c in com_m), "rpy": "0 0 0"})
    ET.SubElement(inertial, "mass", {"value": num(mass_kg)})
    i = np.asarray(inertia_kg_m2, dtype=float)
    ET.SubElement(
        inertial,
        "inertia",
        {
            "ixx": num(i[0, 0]),
            "ixy": num(i[0, 1]),
            "ixz": num(i[0, 2]),
            "iyy": num(i[1, 1]),
            "iyz": num(i[1, 2]),
            "izz": num(i[2, 2]),
        },
    )

    obj = visual.obj.name if visual.obj is not None else f"{name}_visual.obj"
    element = ET.SubElement(link, "visual", {"name": "visual"})
    ET.SubElement(element, "origin", {"xyz": "0 0 0", "rpy": "0 0 0"})
    ET.SubElement(ET.SubElement(element, "geometry"), "mesh", {"filename": obj})
    if visual.texture is None:
        # Loaders that ignore the OBJ's .mtl still get its colour.
        material = ET.SubElement(element, "material", {"name": f"{name}_visual"})
        ET.SubElement(material, "color", {"rgba": " ".join(num(c) for c in visual.rgba)})

    for index, path in enumerate(collision_files):
        element = ET.SubElement(link, "collision", {"name": f"collision_{index}"})
        ET.SubElement(element, "origin", {"xyz": "0 0 0", "rpy": "0 0 0"})
        mesh = ET.SubElement(ET.SubElement(element, "geometry"), "mesh", {"filename": Path(path).name})
        # The piece is convex already; Drake then uses it as a Convex shape, as from the SDF.
        ET.SubElement(mesh, f"{drake}declare_convex")
        props = ET.SubElement(element, f"{drake}proximity_properties")
        ET.SubElement(props, f"{drake}mu_dynamic", {"value": num(mu)})
        ET.SubElement(props, f"{drake}mu_static", {"value": num(mu)})

    gazebo = ET.SubElement(robot, "gazebo", {"reference": LINK})
    ET.SubElement(gazebo, "mu1").text = num(mu)
    ET.SubElement(gazebo, "mu2").text = num(mu)
    ET.indent(robot)
    return "<?xml version='1.0' encoding='utf-8'?>\n" + ET.tostring(robot, encoding="unicode") + "\n"


def write_urdf(path: Path, body: Body) -> Path:
    """Write urdf_text to ``path`` (beside the meshes it names) and return it."""
    Path(path).write_text(urdf_text(body))
    return Path(path)
