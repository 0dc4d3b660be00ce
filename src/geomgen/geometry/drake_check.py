"""Drake as the judge of an SDF package: does it load, is its inertia physical,
does it stand when dropped, and does its collision geometry hug its visual mesh.

pydrake (the ``drake`` extra) is imported inside each function that needs it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geomgen.errors import ConvertError

DROP_HEIGHT_M = 0.02  # gap between the lowest collision point and the floor at release
DROP_DURATION_S = 3.0  # simulated time after release
DROP_TIME_STEP_S = 1e-3  # discrete MultibodyPlant step
GROUND_MU = 0.5  # Coulomb friction of the floor (Drake combines it with the object's)
GROUND_MODULUS_PA = 1.0e7  # compliant hydroelastic floor, for the hydroelastic contact model
GROUND_SLAB_M = 1.0  # thickness of that compliant slab
UPRIGHT_TILT_DEG = 5.0  # an object tilted less than this at the end stands upright
AT_REST_SPEED_M_S = 0.05  # an object whose fastest point is slower than this is at rest
IOU_CELLS = 64  # default voxel pitch: the visual mesh's largest extent / IOU_CELLS
PRECISE_IOU_CELLS = 256  # for judging thresholds: within ~0.005 of exact volumes on the reference meshes
CONTACT_MODELS = ("point", "hydroelastic_with_fallback")
GLTF_SUFFIXES = (".gltf", ".glb")
# Drake loads glTF (+Y up) into its +Z-up frames: (x, y, z) -> (x, -z, y).
GLTF_TO_DRAKE = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclass
class DropResult:
    """The state of an object after a drop test.

    tilt_deg: angle between the body's +Z axis and world +Z at the end, degrees.
    speed_m_s: speed of the body's fastest collision-hull vertex at the end, m/s.
    final_pose: (4, 4) homogeneous transform world <- body at the end, metres.
    settled: speed_m_s below the at-rest threshold.
    upright: tilt_deg below the upright threshold.
    """

    tilt_deg: float
    speed_m_s: float
    final_pose: np.ndarray
    settled: bool
    upright: bool

    @property
    def passed(self) -> bool:
        return self.settled and self.upright


def _require_drake():
    try:
        import pydrake  # noqa: F401
    except ImportError as exc:
        raise ConvertError(
            "checking an SDF needs pydrake; install the drake extra: pip install 'geomgen[drake]'",
            code="drake_missing",
        ) from exc


@contextlib.contextmanager
def _drake_warnings():
    """Collect the warnings Drake logs inside the block instead of printing them.

    Drake's parser only warns about an invalid inertia, then substitutes a
    default one, so these warnings are the evidence validate_sdf needs.
    """
    warnings: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage().strip())
        return False

    logger = logging.getLogger("drake")
    logger.addFilter(keep)
    try:
        yield warnings
    finally:
        logger.removeFilter(keep)


def _load(sdf_path: Path, time_step_s: float = 0.0, ground: dict | None = None):
    """Parse ``sdf_path`` into a finalized plant inside a diagram with a SceneGraph.

    Returns (diagram, plant, scene_graph, model_instance, warnings). ``ground``
    (keys mu, hydroelastic) adds a friction half-space at z = 0 and, when
    hydroelastic, selects Drake's hydroelastic-with-fallback contact model.
    """
    _require_drake()
    from pydrake.multibody.parsing import Parser
    from pydrake.multibody.plant import AddMultibodyPlantSceneGraph
    from pydrake.systems.framework import DiagramBuilder

    sdf_path = Path(sdf_path)
    if not sdf_path.is_file():
        raise ConvertError(f"no SDF file at {sdf_path}", code="drake_rejected")
    builder = DiagramBuilder()
    plant, scene_graph = AddMultibodyPlantSceneGraph(builder, time_step_s)
    with _drake_warnings() as warnings:
        try:
            models = Parser(plant).AddModels(str(sdf_path))
        except Exception as exc:  # Drake raises RuntimeError / ValueError with its parser's message
            raise ConvertError(f"Drake cannot load {sdf_path.name}: {_first_line(exc)}", code="drake_rejected") from exc
        if len(models) != 1:
            raise ConvertError(
                f"{sdf_path.name} holds {len(models)} models; one model per SDF file is expected", code="drake_rejected"
            )
        if ground is not None:
            _add_ground(plant, **ground)
            if ground["hydroelastic"]:
                from pydrake.multibody.plant import ContactModel

                plant.set_contact_model(ContactModel.kHydroelasticWithFallback)
        try:
            plant.Finalize()
            diagram = builder.Build()
        except Exception as exc:
            raise ConvertError(f"Drake rejects {sdf_path.name}: {_first_line(exc)}", code="drake_rejected") from exc
    return diagram, plant, scene_graph, models[0], warnings


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _drake_sentence(warning: str) -> str:
    """Drake's warning on one line, without its file-and-line prefix."""
    text = " ".join(warning.split())
    return text.split("warning: ", 1)[-1]


def _add_ground(plant, mu: float, hydroelastic: bool) -> None:
    from pydrake.geometry import (
        AddCompliantHydroelasticPropertiesForHalfSpace,
        AddContactMaterial,
        HalfSpace,
        ProximityProperties,
    )
    from pydrake.math import RigidTransform
    from pydrake.multibody.plant import CoulombFriction

    props = ProximityProperties()
    AddContactMaterial(friction=CoulombFriction(mu, mu), properties=props)
    if hydroelastic:
        AddCompliantHydroelasticPropertiesForHalfSpace(GROUND_SLAB_M, GROUND_MODULUS_PA, props)
    plant.RegisterCollisionGeometry(plant.world_body(), RigidTransform(), HalfSpace(), "ground", props)


def _model_bodies(plant, model) -> list:
    return [plant.get_body(index) for index in plant.GetBodyIndices(model)]


def validate_sdf(sdf_path: Path) -> dict:
    """Load an SDF package in Drake and check its mass properties.

    Every body of the model must have mass > 0 and a physically valid spatial
    inertia (positive mass, positive-definite rotational inertia satisfying the
    triangle inequality about its centre of mass), and every collision mesh
    must load. Returns ``{"model", "bodies", "mass_kg", "com_m",
    "collision_geometries", "warnings"}``; ``com_m`` is the model's centre of
    mass (3,) in metres, in the body frame for a single-body model; warnings
    are Drake's parser warnings. Raises ConvertError (code ``drake_rejected``)
    with Drake's message otherwise.
    """
    _, plant, _, model, warnings = _load(sdf_path)
    name = Path(sdf_path).name
    inertia_warnings = [_drake_sentence(w) for w in warnings if "inertia" in w.lower()]
    if inertia_warnings:
        raise ConvertError(
            f"Drake rejects the inertia in {name} (mass must be > 0 and the principal moments must satisfy "
            f"the triangle inequality): {'; '.join(inertia_warnings)[:600]}",
            code="drake_rejected",
        )
    bodies = _model_bodies(plant, model)
    n_collision = 0
    for body in bodies:
        mass_kg = body.default_mass()
        if not (math.isfinite(mass_kg) and mass_kg > 0):
            raise ConvertError(f"{name}: body {body.name()!r} has mass {mass_kg} kg; it must be > 0", code="drake_rejected")
        inertia = body.default_spatial_inertia()
        if not inertia.IsPhysicallyValid():
            raise ConvertError(
                f"{name}: body {body.name()!r} has a spatial inertia that is not physically valid "
                f"(mass {mass_kg} kg, rotational inertia about the body origin "
                f"{np.round(inertia.CalcRotationalInertia().CopyToFullMatrix3(), 6).tolist()} kg m^2)",
                code="drake_rejected",
            )
        # Drake builds each collision mesh's convex hull while parsing, so a
        # corrupt or missing piece has already failed in _load.
        n_collision += len(plant.GetCollisionGeometriesForBody(body))
    context = plant.CreateDefaultContext()
    com_m = plant.CalcCenterOfMassPositionInWorld(context, [model])
    return {
        "model": plant.GetModelInstanceName(model),
        "bodies": [body.name() for body in bodies],
        "mass_kg": float(sum(body.default_mass() for body in bodies)),
        "com_m": [float(c) for c in com_m],
        "collision_geometries": n_collision,
        "warnings": [_drake_sentence(w) for w in warnings],
    }


def _hull_vertices_in_body(inspector, geometry_id, sdf_name: str) -> np.ndarray:
    """Vertices (N, 3) bounding the collision shape as Drake's point contact sees
    it (the convex hull of a mesh), in the frame of the body it is attached to."""
    from pydrake.geometry import Box, Convex, Mesh

    shape = inspector.GetShape(geometry_id)
    X_BG = inspector.GetPoseInFrame(geometry_id)
    if isinstance(shape, (Mesh, Convex)):
        try:
            hull = shape.GetConvexHull()
        except Exception as exc:
            raise ConvertError(
                f"{sdf_name}: collision mesh {shape.source().description()} cannot be loaded: {_first_line(exc)}",
                code="drake_rejected",
            ) from exc
        points_G = np.array([hull.vertex(i) for i in range(hull.num_vertices())])
    elif isinstance(shape, Box):
        half = np.array([shape.width(), shape.depth(), shape.height()]) / 2
        points_G = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half
    else:
        # geomgen writes meshes only; curved primitives would need their own lowest-point and fill maths.
        raise ConvertError(
            f"{sdf_name}: collision shape {type(shape).__name__} is not supported by geomgen's checks; use meshes or boxes",
            code="drake_rejected",
        )
    return (X_BG.rotation().matrix() @ points_G.T).T + X_BG.translation()


def drop_test(
    sdf_path: Path,
    drop_height_m: float = DROP_HEIGHT_M,
    duration_s: float = DROP_DURATION_S,
    time_step_s: float = DROP_TIME_STEP_S,
    contact: str = "point",
    ground_mu: float = GROUND_MU,
    upright_tilt_deg: float = UPRIGHT_TILT_DEG,
    at_rest_speed_m_s: float = AT_REST_SPEED_M_S,
) -> DropResult:
    """Drop the model upright onto a floor and report how it ends.

    The model's base body starts with its frame aligned with the world (+Z up),
    centred at x = y = 0, its lowest collision point ``drop_height_m`` above a
    half-space floor at z = 0 with friction ``ground_mu``; it is simulated for
    ``duration_s`` with a discrete plant of step ``time_step_s`` and ``contact``
    ("point" or "hydroelastic_with_fallback").
    """
    if contact not in CONTACT_MODELS:
        raise ValueError(f"contact must be one of {', '.join(CONTACT_MODELS)}, got {contact!r}")
    from pydrake.math import RigidTransform
    from pydrake.systems.analysis import Simulator

    diagram, plant, scene_graph, model, _ = _load(
        sdf_path, time_step_s, ground={"mu": ground_mu, "hydroelastic": contact != "point"}
    )
    bodies = _model_bodies(plant, model)
    base = next((b for b in bodies if b.is_floating_base_body()), None)
    if base is None:
        raise ConvertError(f"{Path(sdf_path).name} has no free body to drop", code="drake_rejected")
    inspector = scene_graph.model_inspector()
    hulls = {
        body.index(): np.concatenate(
            [_hull_vertices_in_body(inspector, gid, Path(sdf_path).name) for gid in plant.GetCollisionGeometriesForBody(body)]
        )
        for body in bodies
        if plant.GetCollisionGeometriesForBody(body)
    }
    if not hulls:
        raise ConvertError(f"{Path(sdf_path).name} has no collision geometry", code="drake_rejected")

    # Drake warns once per run that a rigid half-space cannot touch deformable
    # bodies; there are none here, so its log is swallowed.
    with _drake_warnings():
        simulator = Simulator(diagram)
        context = plant.GetMyMutableContextFromRoot(simulator.get_mutable_context())
        plant.SetFreeBodyPose(context, base, RigidTransform())
        lowest_z_m = min(_world_points(plant, context, plant.get_body(i), pts)[:, 2].min() for i, pts in hulls.items())
        plant.SetFreeBodyPose(context, base, RigidTransform([0.0, 0.0, drop_height_m - lowest_z_m]))
        simulator.Initialize()
        simulator.AdvanceTo(duration_s)

    X_WB = plant.EvalBodyPoseInWorld(context, base)
    z_axis = X_WB.rotation().matrix()[:, 2]
    tilt_deg = math.degrees(math.acos(float(np.clip(z_axis[2], -1.0, 1.0))))
    speed_m_s = max(_max_point_speed(plant, context, plant.get_body(i), pts) for i, pts in hulls.items())
    return DropResult(
        tilt_deg=tilt_deg,
        speed_m_s=speed_m_s,
        final_pose=X_WB.GetAsMatrix4(),
        settled=speed_m_s < at_rest_speed_m_s,
        upright=tilt_deg < upright_tilt_deg,
    )


def _world_points(plant, context, body, points_B: np.ndarray) -> np.ndarray:
    X_WB = plant.EvalBodyPoseInWorld(context, body)
    return (X_WB.rotation().matrix() @ points_B.T).T + X_WB.translation()


def _max_point_speed(plant, context, body, points_B: np.ndarray) -> float:
    """Largest speed (m/s) of the body points ``points_B`` (N, 3)."""
    V_WB = plant.EvalBodySpatialVelocityInWorld(context, body)
    X_WB = plant.EvalBodyPoseInWorld(context, body)
    r_W = (X_WB.rotation().matrix() @ points_B.T).T
    v_W = V_WB.translational() + np.cross(V_WB.rotational(), r_W)
    return float(np.linalg.norm(v_W, axis=1).max())


def collision_iou(sdf_path: Path, pitch_m: float | None = None, cells: int = IOU_CELLS) -> float:
    """Voxel intersection-over-union of the collision geometry and the visual mesh.

    Both are placed as Drake places them: the poses and scales of the SDF, glTF
    visuals turned from +Y up to +Z up, and each collision mesh replaced by its
    convex hull (what point contact uses; pieces are declared convex). The
    solids are sampled at voxel centres of pitch ``pitch_m`` (default: the
    visual's largest extent / ``cells``). The visual mesh is vertex-merged
    first; a voxel is inside it when a majority of ray-parity tests along x, y
    and z say so, which tolerates small holes. Returns a value in [0, 1].

    Accuracy: thin boards aligned with the grid are sampled in whole voxels, so
    at 64 cells the shipped work_desk scores 0.56 against 0.45 from exact mesh
    booleans; at 256 cells (PRECISE_IOU_CELLS) all five reference packages are
    within 0.005 of exact. Compare against thresholds at 256 cells.
    """
    import trimesh

    _, plant, scene_graph, model, _ = _load(sdf_path)
    name = Path(sdf_path).name
    context = plant.CreateDefaultContext()
    inspector = scene_graph.model_inspector()
    visuals, hulls = [], []
    for body in _model_bodies(plant, model):
        X_WB = plant.EvalBodyPoseInWorld(context, body)
        for gid in plant.GetVisualGeometriesForBody(body):
            visuals.append(_visual_in_world(inspector, gid, X_WB, name))
        for gid in plant.GetCollisionGeometriesForBody(body):
            points_B = _hull_vertices_in_body(inspector, gid, name)
            hulls.append((X_WB.rotation().matrix() @ points_B.T).T + X_WB.translation())
    if not visuals:
        raise ConvertError(f"{name} has no visual mesh to compare with", code="drake_rejected")
    if not hulls:
        raise ConvertError(f"{name} has no collision geometry", code="drake_rejected")
    visual = trimesh.util.concatenate(visuals)
    lo = np.minimum(visual.bounds[0], np.min([h.min(axis=0) for h in hulls], axis=0))
    hi = np.maximum(visual.bounds[1], np.max([h.max(axis=0) for h in hulls], axis=0))
    if pitch_m is None:
        pitch_m = float(visual.extents.max()) / cells
    if not (pitch_m > 0 and math.isfinite(pitch_m)):
        raise ValueError(f"pitch_m must be > 0, got {pitch_m}")
    from geomgen.geometry.voxel_sampling import (
        Grid,
        inside_convex_hull,
        inside_mesh,
        iou,
    )

    grid = Grid.around(lo, hi, pitch_m)
    inside_visual = inside_mesh(np.asarray(visual.vertices), np.asarray(visual.faces), grid)
    inside_collision = np.zeros(grid.shape, dtype=bool)
    for points in hulls:
        inside_collision |= inside_convex_hull(points, grid)
    return iou(inside_visual, inside_collision)


def _visual_in_world(inspector, geometry_id, X_WB, sdf_name: str):
    """The visual mesh of ``geometry_id`` as one vertex-merged trimesh in world coordinates."""
    import trimesh
    from pydrake.geometry import Convex, Mesh

    shape = inspector.GetShape(geometry_id)
    if not isinstance(shape, (Mesh, Convex)):
        raise ConvertError(f"{sdf_name}: visual {type(shape).__name__} is not a mesh", code="drake_rejected")
    path = Path(shape.source().path())
    try:
        loaded = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:
        raise ConvertError(f"{sdf_name}: visual mesh {path.name} cannot be read: {exc}", code="drake_rejected") from exc
    vertices = np.asarray(loaded.vertices, dtype=float)
    if path.suffix.lower() in GLTF_SUFFIXES:
        vertices = vertices @ GLTF_TO_DRAKE.T
    vertices = vertices * np.asarray(shape.scale3())
    X_WG = X_WB.multiply(inspector.GetPoseInFrame(geometry_id))
    vertices = (X_WG.rotation().matrix() @ vertices.T).T + X_WG.translation()
    # A plain mesh (no UVs or normals) merges the vertices split at UV seams, closing the surface.
    return trimesh.Trimesh(vertices, np.asarray(loaded.faces), process=True)
