"""``preview.png`` of a package: the visual mesh and the collision pieces side by
side, seen by the same camera, rendered offscreen on the CPU by Drake's VTK
render engine (a real renderer: depth buffer, lighting, the glTF's textures).

Drake is the renderer because every package is already loaded in Drake to be
checked: no second graphics stack to install, and the preview shows the
visual exactly as Drake places it (glTF +Y up turned +Z up).
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np

PREVIEW_FILE = "preview.png"
PANEL_PX = 256  # each half is PANEL_PX x PANEL_PX; the image is 2 * PANEL_PX wide
FOV_Y_RAD = 0.55  # vertical field of view of the camera
# Where the camera sits, seen from the object (Drake body frame, +Z up): in
# front (glTF +Z, the front of generated meshes, is Drake -Y), to the right, above.
VIEW_DIRECTION = np.array([0.55, -1.0, 0.65])
BACKGROUND_RGBA = (0.93, 0.94, 0.96, 1.0)
RENDERER = "preview"
_GOLDEN = 0.618033988749895


def piece_colours(count: int) -> list[tuple[float, float, float]]:
    """``count`` distinct RGB colours in [0, 1], hues spread by the golden ratio
    so that neighbours in the list never look alike."""
    return [colorsys.hsv_to_rgb((0.08 + i * _GOLDEN) % 1.0, 0.75, 0.95) for i in range(count)]


def camera_pose(bounds_m: np.ndarray, fov_y_rad: float = FOV_Y_RAD) -> tuple[np.ndarray, np.ndarray, float]:
    """Camera for an object whose body-frame bounds are ``bounds_m`` (2, 3):
    its rotation (3, 3, columns: the camera's x right, y down, z forward, as
    Drake's cameras want), its position (3,) and the object's bounding-sphere
    radius (m), so that the whole sphere is in view."""
    bounds_m = np.asarray(bounds_m, dtype=float)
    centre = bounds_m.mean(axis=0)
    radius = max(float(np.linalg.norm(bounds_m[1] - bounds_m[0])) / 2.0, 1e-6)
    distance = radius / np.sin(fov_y_rad / 2.0) * 1.02
    forward = -VIEW_DIRECTION / np.linalg.norm(VIEW_DIRECTION)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.column_stack([right, down, forward]), centre - forward * distance, radius


def render_panels(visual_path: Path, collision_paths: Sequence[Path], bounds_m: np.ndarray,
                  panel_px: int = PANEL_PX) -> tuple[np.ndarray, np.ndarray]:
    """Two (panel_px, panel_px, 3) uint8 RGB images from one camera: the visual
    mesh file (glTF +Y up, or any mesh Drake renders, placed as Drake places it)
    and the collision pieces (files in the +Z-up body frame), one colour each.

    Raises ImportError without pydrake; whatever the renderer raises otherwise.
    """
    from pydrake.geometry import (ClippingRange, ColorRenderCamera, Convex, GeometryInstance, MakeRenderEngineVtk, Mesh,
                                  PerceptionProperties, RenderCameraCore, RenderEngineVtkParams, Rgba, SceneGraph)
    from pydrake.math import RigidTransform, RotationMatrix
    from pydrake.systems.sensors import CameraInfo

    rotation, position, radius = camera_pose(bounds_m)
    distance = float(np.linalg.norm(position - np.asarray(bounds_m, dtype=float).mean(axis=0)))
    clipping = ClippingRange(max(distance - 2.0 * radius, distance * 1e-3), distance + 2.0 * radius)
    X_WC = RigidTransform(RotationMatrix(rotation), position)
    camera = ColorRenderCamera(RenderCameraCore(RENDERER, CameraInfo(panel_px, panel_px, FOV_Y_RAD), clipping,
                                                RigidTransform()), False)

    def render(shapes: list[tuple[Path, tuple | None]]) -> np.ndarray:
        # One scene per half: the same camera sees the visual alone, then the pieces alone.
        scene_graph = SceneGraph()
        scene_graph.AddRenderer(RENDERER, MakeRenderEngineVtk(RenderEngineVtkParams(
            default_clear_color=np.array(BACKGROUND_RGBA[:3]))))
        source = scene_graph.RegisterSource("preview")
        for path, rgba in shapes:
            # A collision piece is convex; Drake renders a Convex as its hull, with normals of its own.
            shape = Mesh(str(path), 1.0) if rgba is None else Convex(str(path), 1.0)
            geometry = scene_graph.RegisterAnchoredGeometry(
                source, GeometryInstance(RigidTransform(), shape, Path(path).name))
            properties = PerceptionProperties()
            if rgba is not None:  # None: the mesh's own materials and textures
                properties.AddProperty("phong", "diffuse", Rgba(*rgba))
            scene_graph.AssignRole(source, geometry, properties)
        query = scene_graph.get_query_output_port().Eval(scene_graph.CreateDefaultContext())
        image = query.RenderColorImage(camera, scene_graph.world_frame_id(), X_WC)
        return np.array(image.data, dtype=np.uint8)[..., :3].copy()

    colours = piece_colours(len(collision_paths))
    return (render([(Path(visual_path), None)]),
            render([(Path(path), (*rgb, 1.0)) for path, rgb in zip(collision_paths, colours)]))


def write_preview(path: Path, visual_path: Path, collision_paths: Sequence[Path], bounds_m: np.ndarray,
                  panel_px: int = PANEL_PX) -> Path:
    """Render (render_panels) and write the side-by-side PNG at ``path``:
    (panel_px, 2 * panel_px) pixels, visual on the left, collision on the right,
    each half captioned."""
    from PIL import Image, ImageDraw

    visual, collision = render_panels(visual_path, collision_paths, bounds_m, panel_px)
    image = Image.fromarray(np.concatenate([visual, collision], axis=1))
    draw = ImageDraw.Draw(image)
    draw.line([(panel_px, 0), (panel_px, panel_px - 1)], fill=(160, 160, 170), width=1)
    pieces = len(collision_paths)
    for x, caption in ((4, "visual"), (panel_px + 4, f"collision: {pieces} piece{'s' * (pieces != 1)}")):
        draw.text((x, 3), caption, fill=(40, 40, 48))
    path = Path(path)
    image.save(path, format="PNG")  # optimize=True would cost ~0.2 s for ~10% smaller
    return path
