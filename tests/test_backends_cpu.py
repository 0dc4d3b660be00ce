"""The CPU backends (mesh, silhouette) on real files through the Backend
interface, and sam3d refusing to start rather than pretend."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from geomgen.backends import load_backend_class
from geomgen.backends.base import GenerationInput
from geomgen.backends.mesh import MeshBackend
from geomgen.backends.sam3d import Sam3dBackend
from geomgen.backends.silhouette import SilhouetteBackend, foreground_mask
from geomgen.errors import BackendUnavailable, GenerateError, InputError
from geomgen.geometry.inflate import inflate
from geomgen.geometry.meshio import load_mesh, scene_bounds

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "geomgen" / "samples"
CHAIR_BACKGROUND = (242, 242, 238)  # the plain background benchmarks/make_samples.py draws the chair on


def job(name: str, data: bytes, tmp_path: Path, **options) -> GenerationInput:
    steps: list[str] = []
    return GenerationInput(input_name=name, input_data=data, work_dir=tmp_path, options=options, progress=steps.append)


def only_mesh(glb: bytes) -> trimesh.Trimesh:
    scene = load_mesh(glb, "out.glb")
    assert len(scene.geometry) == 1
    return next(iter(scene.geometry.values()))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_registry_finds_the_cpu_backends_and_sam3d():
    assert load_backend_class("mesh") is MeshBackend
    assert load_backend_class("silhouette") is SilhouetteBackend
    assert load_backend_class("sam3d") is Sam3dBackend
    assert (MeshBackend.input_kind, SilhouetteBackend.input_kind) == ("mesh", "image")
    assert not MeshBackend.uses_gpu and not SilhouetteBackend.uses_gpu and Sam3dBackend.uses_gpu
    assert MeshBackend.check() is None and SilhouetteBackend.check() is None


# --- mesh -------------------------------------------------------------------------------


def asymmetric_box_stl() -> bytes:
    box = trimesh.creation.box(extents=(10.0, 20.0, 30.0))  # millimetres, say
    box.apply_translation((100.0, 200.0, 300.0))
    return box.export(file_type="stl")


def test_mesh_backend_output_conventions(tmp_path):
    backend = MeshBackend()
    backend.load()
    out = backend.generate(job("box.stl", asymmetric_box_stl(), tmp_path))
    bounds = scene_bounds(load_mesh(out.glb, "out.glb"))
    np.testing.assert_allclose(bounds, [[-5.0, 0.0, -15.0], [5.0, 20.0, 15.0]], atol=1e-6)
    assert out.info["faces"] == 12 and out.info["up_axis"] == "y"


def test_mesh_backend_z_up_and_units_from_worker_and_request_options(tmp_path):
    backend = MeshBackend({"up_axis": "z", "unit": "mm"})  # as --backend-option strings
    out = backend.generate(job("box.stl", asymmetric_box_stl(), tmp_path))
    np.testing.assert_allclose(scene_bounds(load_mesh(out.glb, "o.glb")), [[-0.005, 0.0, -0.01], [0.005, 0.03, 0.01]], atol=1e-9)
    # A request overrides the worker's options: y up, centimetres times two.
    out = backend.generate(job("box.stl", asymmetric_box_stl(), tmp_path, up_axis="y", unit="cm", scale=2.0))
    np.testing.assert_allclose(scene_bounds(load_mesh(out.glb, "o.glb")), [[-0.1, 0.0, -0.3], [0.1, 0.4, 0.3]], atol=1e-9)
    assert out.info["scale"] == pytest.approx(0.02)


def test_options_scoped_to_a_backend(tmp_path):
    # One batch, one set of options for two backends: each takes its own keys.
    options = {"silhouette.height_m": "0.3", "mesh.unit": "mm"}
    out = MeshBackend(options).generate(job("box.stl", asymmetric_box_stl(), tmp_path))
    assert out.info["scale"] == pytest.approx(0.001)
    out = SilhouetteBackend(options).generate(job("vase.png", (SAMPLES / "vase.png").read_bytes(), tmp_path))
    assert only_mesh(out.glb).extents[1] == pytest.approx(0.3)
    with pytest.raises(InputError) as info:
        MeshBackend({"height_m": "0.3"})
    assert info.value.code == "bad_option" and "silhouette.height_m" in info.value.message


def test_mesh_backend_keeps_the_sample_texture(tmp_path):
    data = (SAMPLES / "table.glb").read_bytes()
    out = MeshBackend().generate(job("table.glb", data, tmp_path))
    before, after = only_mesh(data), only_mesh(out.glb)
    np.testing.assert_allclose(after.visual.uv, before.visual.uv, atol=1e-6)
    assert after.visual.material.baseColorTexture.size == before.visual.material.baseColorTexture.size
    assert after.bounds[0][1] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "options",
    [{"up_axis": "x"}, {"scale": "big"}, {"scale": "-1"}, {"scale": "nan"}, {"unit": "furlong"}, {"colour": "red"}],
)
def test_mesh_backend_bad_options(options, tmp_path):
    with pytest.raises(InputError) as info:
        MeshBackend(options)
    assert info.value.code == "bad_option"
    with pytest.raises(InputError) as info:
        MeshBackend().generate(job("box.stl", asymmetric_box_stl(), tmp_path, **options))
    assert info.value.code == "bad_option"


def test_mesh_backend_bad_inputs(tmp_path):
    backend = MeshBackend()
    with pytest.raises(InputError) as info:
        backend.generate(job("chair.png", (SAMPLES / "chair.png").read_bytes(), tmp_path))
    assert info.value.code == "bad_mesh" and "silhouette" in info.value.message
    with pytest.raises(InputError) as info:
        backend.generate(job("nan.obj", b"v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n", tmp_path))
    assert info.value.code == "bad_mesh"


# --- silhouette ---------------------------------------------------------------------------


def check_solid(mesh: trimesh.Trimesh, height_m: float) -> None:
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0 and mesh.body_count == 1
    low, high = mesh.bounds
    assert high[1] - low[1] == pytest.approx(height_m, rel=1e-6)
    assert low[1] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose((low + high)[[0, 2]] / 2.0, [0.0, 0.0], atol=1e-9)
    assert mesh.visual.uv is not None and len(mesh.visual.uv) == len(mesh.vertices)
    assert mesh.visual.material.baseColorTexture is not None


def test_silhouette_from_the_alpha_channel(tmp_path):
    data = (SAMPLES / "mug.png").read_bytes()
    out = SilhouetteBackend({"height_m": "0.12"}).generate(job("mug.png", data, tmp_path))
    mesh = only_mesh(out.glb)
    check_solid(mesh, 0.12)
    assert out.info["segmentation"] == "alpha"
    assert mesh.euler_number == 0  # the handle's opening is kept: a torus-like solid
    # The texture is the image's: the white band at mid height (rows 150-180 of
    # the body's 60-270), blue body below it; the body is left of x = 0.
    colours = mesh.visual.to_color().vertex_colors[:, :3].astype(float)
    front = (mesh.vertices[:, 2] > 0.5 * mesh.vertices[:, 2].max()) & (mesh.vertices[:, 0] < 0.0)
    height = mesh.vertices[:, 1] / 0.12
    band = front & (np.abs(height - 0.5) < 0.04)
    body = front & (np.abs(height - 0.2) < 0.04)
    assert colours[band].mean(axis=0).min() > 160
    blue = colours[body].mean(axis=0)
    assert blue[2] > 1.5 * blue[0]
    # Nor mirrored: the thin handle is on the right, so the solid's mass sits left of centre.
    assert mesh.center_mass[0] < -0.002


def test_silhouette_on_a_plain_background(tmp_path):
    data = (SAMPLES / "chair.png").read_bytes()
    out = SilhouetteBackend().generate(job("chair.png", data, tmp_path, height_m=0.9, depth_ratio=0.5))
    mesh = only_mesh(out.glb)
    check_solid(mesh, 0.9)
    assert out.info["segmentation"] in ("grabcut", "threshold")
    deep = only_mesh(SilhouetteBackend().generate(job("chair.png", data, tmp_path, height_m=0.9)).glb)
    assert mesh.extents[2] == pytest.approx(deep.extents[2] / 2.0, rel=0.05)  # depth_ratio halves the depth


def footprint(mesh: trimesh.Trimesh) -> np.ndarray:
    """(x, z) of the vertices the solid rests on, shape (n, 2)."""
    return mesh.vertices[mesh.vertices[:, 1] < 1e-9][:, [0, 2]]


@pytest.mark.parametrize("sample", ["mug.png", "chair.png"])
def test_silhouette_stands_on_a_flat_base(sample, tmp_path):
    from scipy.spatial import Delaunay

    data = (SAMPLES / sample).read_bytes()
    mesh = only_mesh(SilhouetteBackend().generate(job(sample, data, tmp_path)).glb)
    check_solid(mesh, 1.0)
    feet = footprint(mesh)
    # The footprint has real depth and holds the centre of mass: an upright
    # solid does not rock over on a rounded rim.
    assert np.ptp(feet[:, 1]) > 0.3 * mesh.extents[2]
    assert Delaunay(feet).find_simplex(mesh.center_mass[[0, 2]]) >= 0
    rounded = only_mesh(SilhouetteBackend().generate(job(sample, data, tmp_path, flat_base="off")).glb)
    check_solid(rounded, 1.0)
    assert np.ptp(footprint(rounded)[:, 1]) < 1e-6  # without it, the bottom is a rim line


def inflated(mask: np.ndarray, **kwargs) -> trimesh.Trimesh:
    vertices, faces = inflate(np.pad(mask, 3), **kwargs)
    return trimesh.Trimesh(vertices=vertices[:, [1, 0, 2]] * [1, -1, 1], faces=faces, process=False)


def test_inflated_disc_is_a_sphere():
    y, x = np.mgrid[0:81, 0:81]
    disc = (x - 40) ** 2 + (y - 40) ** 2 <= 30.5**2
    mesh = inflated(disc, flat_base=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(4.0 / 3.0 * np.pi * 30.5**3, rel=0.05)
    assert mesh.extents[2] == pytest.approx(mesh.extents[0], rel=0.08)  # distances are measured from pixel centres
    half = inflated(disc, flat_base=False, depth_ratio=0.5)
    assert half.volume == pytest.approx(mesh.volume / 2.0, rel=0.02)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("flat_base", [True, False])
def test_inflate_closes_any_mask(seed, flat_base):
    # Blobs with holes, thin strokes and pixels touching only at corners.
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random((48, 40)), 2.0 + seed % 3) > 0.5
    mask |= rng.random(mask.shape) > 0.97
    mask[rng.integers(0, 48), :] = True
    mesh = inflated(mask, flat_base=flat_base)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert all(body.volume > 0 for body in mesh.split(only_watertight=False))


def test_segmentation_matches_the_drawn_outline():
    image = Image.open(SAMPLES / "chair.png").convert("RGBA")
    mask, method = foreground_mask(image, work_px=image.height)
    truth = np.abs(np.asarray(image)[..., :3].astype(int) - CHAIR_BACKGROUND).max(axis=-1) > 16
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.97, (method, iou)


def test_silhouette_texture_is_upright(tmp_path):
    out = SilhouetteBackend().generate(job("lamp.png", (SAMPLES / "lamp.png").read_bytes(), tmp_path))
    mesh = only_mesh(out.glb)
    check_solid(mesh, 1.0)
    colours = mesh.visual.to_color().vertex_colors[:, :3].astype(float)
    front = mesh.vertices[:, 2] > 0.3 * mesh.vertices[:, 2].max()
    shade = colours[front & (mesh.vertices[:, 1] > 0.75)].mean(axis=0)  # the fabric shade is on top
    base = colours[front & (mesh.vertices[:, 1] < 0.08)].mean(axis=0)  # the metal base at the bottom
    assert shade[0] > shade[2] + 50 and shade.mean() > 150
    assert base.mean() < 110


def test_silhouette_texture_quadrants_land_where_they_are_drawn(tmp_path):
    # An ellipse whose quarters are red, green (top left, right) and blue, yellow
    # (bottom left, right): any flip or mirror of the UVs swaps two of them.
    rgba = np.zeros((120, 160, 4), dtype=np.uint8)
    y, x = np.mgrid[0:120, 0:160]
    rgba[..., 3] = np.where(((x - 80) / 70.0) ** 2 + ((y - 60) / 50.0) ** 2 <= 1.0, 255, 0)
    quarters = {(0, 0): (220, 20, 20), (0, 1): (20, 220, 20), (1, 0): (20, 20, 220), (1, 1): (220, 220, 20)}
    for (row, col), colour in quarters.items():
        rgba[((y >= 60) == bool(row)) & ((x >= 80) == bool(col)), :3] = colour
    out = SilhouetteBackend().generate(job("quarters.png", png_bytes(Image.fromarray(rgba)), tmp_path, height_m=1.0))
    mesh = only_mesh(out.glb)
    check_solid(mesh, 1.0)
    colours = mesh.visual.to_color().vertex_colors[:, :3].astype(int)
    v = mesh.vertices
    for side in (1, -1):  # front, and the back that shows the same picture through the solid
        facing = side * v[:, 2] > 0.3 * np.abs(v[:, 2]).max()
        for (row, col), colour in quarters.items():
            upper = v[:, 1] > 0.6 if row == 0 else v[:, 1] < 0.4
            right = v[:, 0] > 0.15 if col == 1 else v[:, 0] < -0.15
            picked = colours[facing & upper & right]
            assert len(picked) > 20
            np.testing.assert_allclose(np.median(picked, axis=0), colour, atol=30)


def test_silhouette_vase(tmp_path):
    out = SilhouetteBackend().generate(job("vase.png", (SAMPLES / "vase.png").read_bytes(), tmp_path))
    check_solid(only_mesh(out.glb), 1.0)


def test_silhouette_texture_of_a_big_photo_is_capped(tmp_path):
    big = Image.open(SAMPLES / "vase.png").resize((1024, 1536))
    out = SilhouetteBackend().generate(job("vase.png", png_bytes(big), tmp_path, texture_px=256, resolution=64))
    mesh = only_mesh(out.glb)
    check_solid(mesh, 1.0)
    assert max(mesh.visual.material.baseColorTexture.size) <= 256
    assert out.info["grid_px"][1] == 64


@pytest.mark.parametrize(
    "name, image",
    [
        ("clear.png", Image.new("RGBA", (64, 64), (0, 0, 0, 0))),
        ("grey.png", Image.new("RGB", (64, 64), (128, 128, 128))),
        ("noise.png", Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))),
        ("speck.png", Image.fromarray(np.pad(np.zeros((1, 1, 3), np.uint8), ((40, 40), (40, 40), (0, 0)), constant_values=250))),
    ],
)
def test_silhouette_without_an_object(name, image, tmp_path):
    with pytest.raises(InputError) as info:
        SilhouetteBackend().generate(job(name, png_bytes(image), tmp_path))
    assert info.value.code == "no_object"
    assert "alpha channel" in info.value.message and "plain background" in info.value.message


def test_silhouette_bad_image_and_options(tmp_path):
    data = (SAMPLES / "mug.png").read_bytes()
    with pytest.raises(InputError) as info:
        SilhouetteBackend().generate(job("mug.png", data[: len(data) // 2], tmp_path))
    assert info.value.code == "bad_image"
    for options in ({"height_m": "0"}, {"depth_ratio": "thick"}, {"resolution": "12.5"}, {"size": "1"}, {"flat_base": "maybe"}):
        with pytest.raises(InputError) as info:
            SilhouetteBackend(options)
        assert info.value.code == "bad_option"


# --- sam3d --------------------------------------------------------------------------------


def test_sam3d_refuses_to_start_and_to_generate(tmp_path):
    reason = Sam3dBackend.check()
    assert reason and ("geomgen[sam3d]" in reason or "not implemented" in reason)
    backend = Sam3dBackend()
    with pytest.raises(BackendUnavailable) as info:
        backend.load()
    assert info.value.message == reason
    with pytest.raises(GenerateError) as info:
        backend.generate(job("mug.png", (SAMPLES / "mug.png").read_bytes(), tmp_path))
    assert "not loaded" in info.value.message
