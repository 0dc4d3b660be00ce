"""Mesh I/O on real files: trimesh writers, the shipped sample and the shared
Hunyuan3D meshes; every bad-mesh case gets its own clear error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from tests.conftest import SHARED_DATA
from geomgen import defaults
from geomgen.errors import InputError
from geomgen.geometry.meshio import (
    export_glb,
    load_mesh,
    load_mesh_file,
    scene_bounds,
    to_output_conventions,
)

SAMPLE_GLB = Path(__file__).resolve().parents[1] / "src" / "geomgen" / "samples" / "table.glb"
MUG_GLTF = SHARED_DATA / "scenesmith_assets" / "coffee_mug" / "coffee_mug.gltf"


def asymmetric_box() -> trimesh.Trimesh:
    """A 1 x 2 x 3 box away from the origin, so axes and offsets cannot hide."""
    box = trimesh.creation.box(extents=(1.0, 2.0, 3.0))
    box.apply_translation((5.0, 6.0, 7.0))
    return box


def textured_quad_scene() -> trimesh.Scene:
    texture = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3) % 251)
    mesh = trimesh.Trimesh(
        vertices=[[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 0.5]],
        faces=[[0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4], [0, 2, 1], [0, 3, 2]],
        visual=trimesh.visual.TextureVisuals(
            uv=[[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]],
            material=trimesh.visual.material.PBRMaterial(baseColorTexture=texture),
        ),
        process=False,
    )
    return trimesh.Scene(mesh)


def glb_with_tree_edit(glb: bytes, edit) -> bytes:
    """Rewrite a GLB's JSON chunk with ``edit(tree)``, keeping its BIN chunk."""
    json_length = struct.unpack_from("<I", glb, 12)[0]
    tree = json.loads(glb[20 : 20 + json_length])
    edit(tree)
    chunk = json.dumps(tree).encode()
    chunk += b" " * (-len(chunk) % 4)
    rest = glb[20 + json_length :]
    return struct.pack("<5I", 0x46546C67, 2, 20 + len(chunk) + len(rest), len(chunk), 0x4E4F534A) + chunk + rest


def bad_mesh(data: bytes, name: str) -> InputError:
    with pytest.raises(InputError) as info:
        load_mesh(data, name)
    assert info.value.code == "bad_mesh", info.value
    assert name in info.value.message
    return info.value


# --- loading -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, data",
    [
        ("box.glb", asymmetric_box().export(file_type="glb")),
        ("box.gltf", trimesh.Scene(asymmetric_box()).export(file_type="gltf", embed_buffers=True)["model.gltf"]),
        ("box.obj", asymmetric_box().export(file_type="obj").encode()),
        ("box.ply", asymmetric_box().export(file_type="ply")),
        ("box.stl", asymmetric_box().export(file_type="stl")),
        ("box.stl", asymmetric_box().export(file_type="stl_ascii").encode()),
    ],
)
def test_every_format_loads_from_bytes(name, data):
    scene = load_mesh(data, name)
    assert isinstance(scene, trimesh.Scene)
    assert sum(len(g.faces) for g in scene.geometry.values()) == 12
    np.testing.assert_allclose(scene_bounds(scene), [[4.5, 5.0, 5.5], [5.5, 7.0, 8.5]], atol=1e-6)


def test_textures_and_uvs_survive_load_normalise_export():
    scene = load_mesh(SAMPLE_GLB.read_bytes(), "table.glb")
    before = next(iter(scene.geometry.values()))
    again = load_mesh(export_glb(to_output_conventions(scene)), "again.glb")
    after = next(iter(again.geometry.values()))
    np.testing.assert_allclose(after.visual.uv, before.visual.uv, atol=1e-6)
    texture_before = np.asarray(before.visual.material.baseColorTexture.convert("RGB"))
    texture_after = np.asarray(after.visual.material.baseColorTexture.convert("RGB"))
    assert (texture_after == texture_before).all()


def test_real_gltf_with_external_files_from_disk_and_as_bytes():
    scene = load_mesh_file(MUG_GLTF)
    mesh = next(iter(scene.geometry.values()))
    assert len(mesh.faces) == 40_000 and mesh.visual.uv.shape == (len(mesh.vertices), 2)
    np.testing.assert_allclose(scene_bounds(scene)[1] - scene_bounds(scene)[0], [0.0752, 0.08, 0.1049], atol=5e-4)
    # The same file as bytes cannot bring its .bin files along: a clear error, no file access.
    error = bad_mesh(MUG_GLTF.read_bytes(), "coffee_mug.gltf")
    assert "gltf_buffer_0.bin" in error.message and "self-contained GLB" in error.message
    # Exported as one GLB it travels fine, texture included.
    reloaded = load_mesh(export_glb(to_output_conventions(scene)), "coffee_mug.glb")
    again = next(iter(reloaded.geometry.values()))
    assert again.visual.material.baseColorTexture.size == mesh.visual.material.baseColorTexture.size
    assert len(again.faces) == 40_000


def test_obj_with_material_library_on_disk_and_without_it(tmp_path):
    (tmp_path / "part.mtl").write_text("newmtl paint\nKd 1 1 1\nmap_Kd paint.png\n")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "paint.png")
    obj = "mtllib part.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nvt 0 0\nvt 1 0\nvt 0 1\nusemtl paint\n"
    obj += "f 1/1 3/3 2/2\nf 1/1 2/2 4/3\nf 1/1 4/3 3/3\nf 2/2 3/3 4/3\n"
    (tmp_path / "part.obj").write_text(obj)
    on_disk = next(iter(load_mesh_file(tmp_path / "part.obj").geometry.values()))
    assert on_disk.visual.material.image is not None
    as_bytes = load_mesh(obj.encode(), "part.obj")
    assert any("material library" in w for w in as_bytes.metadata["warnings"])


def test_load_mesh_file_errors(tmp_path):
    with pytest.raises(InputError) as info:
        load_mesh_file(tmp_path / "missing.glb")
    assert info.value.code == "unreadable_input"
    tree = json.loads(MUG_GLTF.read_text())
    (tmp_path / "lonely.gltf").write_text(json.dumps(tree))  # its .bin files are elsewhere
    with pytest.raises(InputError) as info:
        load_mesh_file(tmp_path / "lonely.gltf")
    assert info.value.code == "bad_mesh" and "gltf_buffer_0.bin" in info.value.message


def test_glb_referencing_external_buffer_or_image():
    glb = asymmetric_box().export(file_type="glb")
    external_buffer = glb_with_tree_edit(glb, lambda t: t["buffers"].append({"uri": "more.bin", "byteLength": 8}))
    assert "'more.bin'" in bad_mesh(external_buffer, "ext-buffer.glb").message
    textured = export_glb(textured_quad_scene())

    def image_by_path(tree):
        tree["images"][0].pop("bufferView")
        tree["images"][0]["uri"] = "../../etc/texture.png"

    assert "texture.png" in bad_mesh(glb_with_tree_edit(textured, image_by_path), "ext-image.glb").message


def test_gltf_json_with_external_and_data_uris():
    gltf = trimesh.Scene(asymmetric_box()).export(file_type="gltf", embed_buffers=True)["model.gltf"]
    tree = json.loads(gltf)
    assert tree["buffers"][0]["uri"].startswith("data:")
    tree["buffers"][0]["uri"] = "/etc/hostname"
    assert "/etc/hostname" in bad_mesh(json.dumps(tree).encode(), "box.gltf").message


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("nan.obj", b"v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n", "NaN or infinite"),
        ("inf.obj", b"v 0 0 0\nv 1 0 0\nv 0 inf 0\nf 1 2 3\n", "NaN or infinite"),
        (
            "points.ply",
            b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
            b"end_header\n0 0 0\n1 0 0\n0 1 0\n",
            "no triangle faces",
        ),
        ("vertices.obj", b"v 0 0 0\nv 1 0 0\nv 0 1 0\n", "no triangle faces"),
        ("empty.stl", b"solid empty\nendsolid empty\n", "no triangle faces"),
        ("index.obj", b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n", "cannot parse"),
        ("header.ply", b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n", "cannot parse"),
        ("point.obj", b"v 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\n", "one point"),
        ("huge.obj", b"v 0 0 0\nv 1e12 0 0\nv 0 1 0\nf 1 2 3\n", "absurd"),
        ("cut.stl", asymmetric_box().export(file_type="stl")[:300], "truncated"),
        ("cut.glb", asymmetric_box().export(file_type="glb")[:200], "truncated"),
        ("bad.gltf", b'{"asset": {"version": "2.0"}, "meshes": [', "not valid"),
        ("old.gltf", b'{"asset": {"version": "1.0"}}', "version 1.0"),
        ("photo.glb", b"\x89PNG\r\n\x1a\n" + bytes(64), "not a mesh"),
    ],
)
def test_bad_meshes(name, data, words):
    assert words in bad_mesh(data, name).message


def test_compressed_gltf_is_refused_by_name():
    def require_draco(tree):
        tree["extensionsRequired"] = ["KHR_draco_mesh_compression"]

    glb = glb_with_tree_edit(asymmetric_box().export(file_type="glb"), require_draco)
    assert "KHR_draco_mesh_compression" in bad_mesh(glb, "draco.glb").message


def test_empty_and_oversized_inputs(monkeypatch):
    with pytest.raises(InputError) as info:
        load_mesh(b"", "nothing.glb")
    assert info.value.code == "empty_input"
    data = asymmetric_box().export(file_type="glb")
    monkeypatch.setattr(defaults, "MAX_INPUT_BYTES", len(data) - 1)
    assert "input limit" in bad_mesh(data, "big.glb").message


def test_not_a_mesh_at_all():
    with pytest.raises(InputError) as info:
        load_mesh(b"%PDF-1.5\n...", "drawing.pdf")
    assert info.value.code == "unknown_format"


# --- output conventions -----------------------------------------------------------------


def test_y_up_input_rests_on_the_floor_centred():
    scene = to_output_conventions(load_mesh(asymmetric_box().export(file_type="glb"), "box.glb"))
    np.testing.assert_allclose(scene_bounds(scene), [[-0.5, 0.0, -1.5], [0.5, 2.0, 1.5]], atol=1e-9)


def test_z_up_rotation_maps_z_to_y_and_y_to_minus_z():
    # A tetrahedron whose apex points along +Z and whose "front" tip points along +Y.
    mesh = trimesh.Trimesh(
        vertices=[[0, 0, 0], [1, 0, 0], [0, 3, 0], [0, 0, 2]], faces=[[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]
    )
    scene = to_output_conventions(load_mesh(mesh.export(file_type="stl"), "tet.stl"), up_axis="z")
    out = next(iter(scene.geometry.values()))
    bounds = scene_bounds(scene)
    np.testing.assert_allclose(bounds[1] - bounds[0], [1.0, 2.0, 3.0], atol=1e-9)  # height is the old z
    apex = out.vertices[np.argmax(out.vertices[:, 1])]
    tip = out.vertices[np.argmin(out.vertices[:, 2])]  # the old +Y tip now points to -Z
    np.testing.assert_allclose(apex[[0, 2]], [-0.5, 1.5], atol=1e-9)  # above the old origin corner
    np.testing.assert_allclose(tip[[0, 1]], [-0.5, 0.0], atol=1e-9)
    assert out.volume > 0  # a rotation keeps the winding outward


def test_scale_and_node_transforms_are_baked_exactly():
    box = trimesh.creation.box(extents=(2.0, 2.0, 2.0))
    scene = trimesh.Scene()
    turn = trimesh.transformations.rotation_matrix(np.pi / 4, [1, 0, 0])
    turn[:3, 3] = (10.0, -3.0, 4.0)
    scene.add_geometry(box, node_name="tilted", transform=turn)
    out = to_output_conventions(scene, scale=0.5)
    mesh = next(iter(out.geometry.values()))
    for node in out.graph.nodes_geometry:
        np.testing.assert_allclose(out.graph[node][0], np.eye(4))
    # A cube turned 45 degrees spans sqrt(2) * edge in y and z: exact, not a box of a box.
    np.testing.assert_allclose(mesh.bounds, [[-0.5, 0.0, -np.sqrt(2) / 2], [0.5, np.sqrt(2), np.sqrt(2) / 2]], atol=1e-9)


def test_conventions_reject_bad_arguments():
    scene = load_mesh(asymmetric_box().export(file_type="glb"), "box.glb")
    for kwargs in ({"up_axis": "x"}, {"scale": 0.0}, {"scale": float("nan")}, {"scale": -2.0}, {"scale": True}):
        with pytest.raises(InputError) as info:
            to_output_conventions(scene, **kwargs)
        assert info.value.code == "bad_option"
