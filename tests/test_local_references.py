"""`geomgen convert` reads only what it may: a glTF's buffers and images and an
OBJ's material library and textures are read from inside the input's folder
('..' and symlinks resolved), and a reference anywhere else is refused,
naming it, before any byte of it is read. Runs the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh
from PIL import Image

from geomgen.errors import InputError
from geomgen.inputs import local_reference
from tests.conftest import REPO


def gltf_with_external_files(folder: Path, stem: str = "crate") -> dict:
    """A textured box as ``<stem>.gltf`` with its buffers and a PNG texture
    beside it in ``folder``; returns the glTF tree."""
    box = trimesh.creation.box([0.3, 0.3, 0.3])
    box.apply_translation([0.0, 0.15, 0.0])
    files = trimesh.Scene(box).export(file_type="gltf")
    tree = json.loads(files.pop("model.gltf"))
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "paint.png")
    tree["images"] = [{"uri": "paint.png"}]
    tree["textures"] = [{"source": 0}]
    tree["materials"] = [{"pbrMetallicRoughness": {"baseColorTexture": {"index": 0}}}]
    for primitive in tree["meshes"][0]["primitives"]:
        primitive["material"] = 0
    (folder / f"{stem}.gltf").write_text(json.dumps(tree))
    return tree


def geomgen_convert(*args: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run([sys.executable, "-m", "geomgen", "convert", *args, "--json", "--timeout", "60"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode in (0, 1), result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_references_outside_the_folder_are_refused_and_inside_ones_convert(tmp_path):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    tree = gltf_with_external_files(inside)
    buffer_name = tree["buffers"][0]["uri"]
    # Outside: a valid copy of the buffer (reading it would succeed) and a FIFO
    # with no writer (opening it would block: the run would hit its timeout).
    (outside / buffer_name).write_bytes((inside / buffer_name).read_bytes())
    os.mkfifo(outside / "trap.bin")
    (inside / "link.bin").symlink_to(outside / buffer_name)

    def variant(stem: str, buffer_uri: str | None = None, image_uri: str | None = None) -> Path:
        changed = json.loads(json.dumps(tree))
        if buffer_uri is not None:
            changed["buffers"][0]["uri"] = buffer_uri
        if image_uri is not None:
            changed["images"][0]["uri"] = image_uri
        path = inside / f"{stem}.gltf"
        path.write_text(json.dumps(changed))
        return path

    refused = {
        "dotdot": f"../outside/{buffer_name}",
        "passwd": "../../../../../../../etc/passwd",
        "absolute": str(outside / buffer_name),
        "link": "link.bin",
        "fifo": "../outside/trap.bin",
    }
    paths = [variant(stem, buffer_uri=uri) for stem, uri in refused.items()]
    paths.append(variant("image", image_uri="../outside/trap.bin"))
    refused["image"] = "../outside/trap.bin"
    # An OBJ whose material library is outside, and one whose library is inside but names an outside texture.
    obj = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n"
    (outside / "paint.mtl").write_text("newmtl paint\nKd 1 1 1\n")
    (inside / "far.obj").write_text("mtllib ../outside/paint.mtl\n" + obj)
    (inside / "near.mtl").write_text("newmtl paint\nKd 1 1 1\nmap_Kd ../outside/trap.bin\n")
    (inside / "near.obj").write_text("mtllib near.mtl\n" + obj)
    paths += [inside / "far.obj", inside / "near.obj"]
    refused.update({"far": "../outside/paint.mtl", "near": "../outside/trap.bin"})
    paths.append(inside / "crate.gltf")  # buffers and texture beside it: converts

    rows = geomgen_convert(*map(str, paths), "--out", str(tmp_path / "out"), "--collision", "hull")
    by_stem = {Path(row["input"]).stem: row for row in rows}
    assert set(by_stem) == set(refused) | {"crate"}
    for stem, uri in refused.items():
        row = by_stem[stem]
        assert row["status"] == "error", row
        assert row["error"].startswith("input/unsafe_reference: "), row
        assert repr(uri) in row["error"], row  # the error names the reference
    crate = by_stem["crate"]
    assert crate["status"] == "ok", crate
    package = Path(crate["sdf_path"]).parent
    assert (package / "crate_texture_0.png").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["crate"]  # no scratch folders left


def test_local_reference_resolves_inside_the_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"x")
    assert local_reference(tmp_path, "sub/../sub/a.bin", "x") == (tmp_path / "sub" / "a.bin").resolve()
    for reference in ("", "..", "../x", "/etc/passwd", "file:///etc/passwd", "http://example.com/a.bin"):
        with pytest.raises(InputError) as info:
            local_reference(tmp_path / "sub", reference, "the glTF's buffer 0")
        assert info.value.code == "unsafe_reference" and repr(reference) in info.value.message
