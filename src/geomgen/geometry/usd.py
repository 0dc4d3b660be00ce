"""OpenUSD (``.usda``) of one package, for Isaac Sim and Omniverse: metres and
+Z up in the stage metadata, one rigid body (UsdPhysics RigidBodyAPI and
MassAPI with geomgen's mass, centre of mass and principal inertia), the convex
collision pieces as meshes with CollisionAPI and approximation "convexHull"
bound to a physics material carrying the friction, and the textured visual
as a UsdPreviewSurface. Needs usd-core (the ``usd`` extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geomgen.geometry.formats import Body, principal_axes, quat_wxyz


def write_usd(path: Path, body: Body) -> Path:
    """Write the stage to ``path`` (beside the texture it names) and return it.
    ``com_m`` (3,), ``inertia_kg_m2`` (3, 3) about the COM, +Z-up body frame.
    USD stores these as 32-bit floats."""
    name, visual, collision_files, mass_kg, com_m, inertia_kg_m2, mu = body.fields()
    import trimesh
    from pxr import Gf, Sdf, Usd, UsdGeom, UsdPhysics, UsdShade, Vt

    path = Path(path)
    stage = Usd.Stage.CreateNew(str(path))
    UsdGeom.SetStageMetersPerUnit(stage, 1.0)
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.z)
    UsdPhysics.SetStageKilogramsPerUnit(stage, 1.0)
    root = UsdGeom.Xform.Define(stage, f"/{name}")
    stage.SetDefaultPrim(root.GetPrim())

    body = root.GetPrim()
    UsdPhysics.RigidBodyAPI.Apply(body)
    mass = UsdPhysics.MassAPI.Apply(body)
    mass.CreateMassAttr(float(mass_kg))
    mass.CreateCenterOfMassAttr(Gf.Vec3f(*(float(c) for c in com_m)))
    moments, axes = principal_axes(inertia_kg_m2)
    mass.CreateDiagonalInertiaAttr(Gf.Vec3f(*(float(m) for m in moments)))
    w, x, y, z = quat_wxyz(axes)
    mass.CreatePrincipalAxesAttr(Gf.Quatf(float(w), Gf.Vec3f(float(x), float(y), float(z))))

    physics = UsdShade.Material.Define(stage, f"/{name}/Looks/physics_material")
    friction = UsdPhysics.MaterialAPI.Apply(physics.GetPrim())
    friction.CreateStaticFrictionAttr(float(mu))
    friction.CreateDynamicFrictionAttr(float(mu))
    friction.CreateRestitutionAttr(0.0)

    UsdGeom.Scope.Define(stage, f"/{name}/collisions")
    for index, piece_path in enumerate(collision_files):
        piece = trimesh.load(str(piece_path), force="mesh", process=False)
        mesh = _mesh(stage, f"/{name}/collisions/collision_{index}", np.asarray(piece.vertices), np.asarray(piece.faces))
        mesh.CreatePurposeAttr(UsdGeom.Tokens.guide)  # not drawn; the visual is
        prim = mesh.GetPrim()
        UsdPhysics.CollisionAPI.Apply(prim)
        UsdPhysics.MeshCollisionAPI.Apply(prim).CreateApproximationAttr(UsdPhysics.Tokens.convexHull)
        binding = UsdShade.MaterialBindingAPI.Apply(prim)
        binding.Bind(physics, UsdShade.Tokens.weakerThanDescendants, "physics")

    mesh = _mesh(stage, f"/{name}/visual", visual.vertices, visual.faces)
    look = UsdShade.Material.Define(stage, f"/{name}/Looks/visual_material")
    surface = UsdShade.Shader.Define(stage, f"/{name}/Looks/visual_material/surface")
    surface.CreateIdAttr("UsdPreviewSurface")
    surface.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(0.8)
    surface.CreateInput("metallic", Sdf.ValueTypeNames.Float).Set(0.0)
    look.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")
    if visual.texture is not None and visual.uv is not None:
        st = UsdGeom.PrimvarsAPI(mesh).CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray, UsdGeom.Tokens.vertex)
        st.Set(Vt.Vec2fArray.FromNumpy(np.asarray(visual.uv, dtype=np.float32)))
        reader = UsdShade.Shader.Define(stage, f"/{name}/Looks/visual_material/st_reader")
        reader.CreateIdAttr("UsdPrimvarReader_float2")
        reader.CreateInput("varname", Sdf.ValueTypeNames.Token).Set("st")
        texture = UsdShade.Shader.Define(stage, f"/{name}/Looks/visual_material/base_color")
        texture.CreateIdAttr("UsdUVTexture")
        texture.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(f"./{visual.texture.name}")
        texture.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set("sRGB")
        texture.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(reader.ConnectableAPI(), "result")
        texture.CreateOutput("rgb", Sdf.ValueTypeNames.Float3)
        surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).ConnectToSource(texture.ConnectableAPI(), "rgb")
    else:
        r, g, b, _ = visual.rgba
        surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).Set(Gf.Vec3f(r, g, b))
    UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(look)

    stage.GetRootLayer().Save()
    return path


def _mesh(stage, prim_path: str, vertices: np.ndarray, faces: np.ndarray):
    """A UsdGeom.Mesh of triangles: vertices (N, 3) metres, faces (M, 3)."""
    from pxr import UsdGeom, Vt

    faces = np.asarray(faces, dtype=np.int32)
    mesh = UsdGeom.Mesh.Define(stage, prim_path)
    points = np.asarray(vertices, dtype=np.float32)
    mesh.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(points))
    mesh.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(np.full(len(faces), 3, dtype=np.int32)))
    mesh.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(faces.reshape(-1)))
    mesh.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
    mesh.CreateExtentAttr(Vt.Vec3fArray.FromNumpy(np.array([points.min(axis=0), points.max(axis=0)])))
    return mesh
