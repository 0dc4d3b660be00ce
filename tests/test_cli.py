"""The command line and the launcher: every command's --help, one-line errors,
`geomgen health` against a real broker process, `geomgen generate --json`
end to end through an embedded stack, `geomgen convert --json`, `geomgen serve`
stopped with Ctrl-C, and GeometryServer reporting a worker that cannot start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from geomgen.cli import cli
from geomgen.errors import TransportError
from geomgen.server import GeometryServer
from tests.conftest import REPO, free_base_port, wait_for
from tests.plugins import SlowBackend

SAMPLES = REPO / "src" / "geomgen" / "samples"
COMMANDS = ["broker", "gpu-worker", "sdf-worker", "serve", "generate", "demo", "health", "convert", "doctor", "keys"]


def geomgen(*args: str, timeout_s: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m geomgen ARGS`` as a real process."""
    return subprocess.run([sys.executable, "-m", "geomgen", *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {command}" in result.output or f"Usage: geomgen {command}" in result.output
    first_line = result.output.split("\n\n")[1].strip()
    assert len(first_line) > 20, f"{command} --help needs a sentence saying what it does"


def test_top_level_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("args, message", [
    (["health", "--broker", "tcp://[oops"], "cannot read broker address"),
    (["gpu-worker", "--backend", "mesh", "--backend-option", "no-equals-sign"], "expected KEY=VALUE"),
    (["generate", "x.png", "--out", "o", "--mass-kg", "1", "--density", "2"], "mass_kg or density_kg_m3"),
    (["convert", "x.glb", "--out", "o", "--collision-param", "thresold=0.1"], "unknown coacd collision option(s) thresold"),
])
def test_bad_arguments_give_one_clear_line(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_health_of_a_real_broker(procs, endpoints):
    procs.start("broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port))
    address = f"127.0.0.1:{endpoints.client_port}"
    as_json = geomgen("health", "--broker", address, "--json", "--timeout", "20")
    assert as_json.returncode == 0, as_json.stderr
    stats = json.loads(as_json.stdout)
    assert stats["in_flight"] == 0 and "silhouette" in stats["backends"] and stats["uptime_s"] >= 0
    table = geomgen("health", "--broker", f"tcp://{address}", "--timeout", "20")
    assert table.returncode == 0, table.stderr
    assert stats["broker_id"] in table.stdout and "silhouette" in table.stdout and "SDF workers" in table.stdout


def test_health_without_a_broker_is_one_line():
    port = free_base_port()
    result = geomgen("health", "--broker", f"127.0.0.1:{port}", "--timeout", "0.5", timeout_s=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"geomgen: error: no answer from the broker at tcp://127.0.0.1:{port} for 0.5 s; "
        "is `geomgen broker` running?"
    ]


def test_generate_json_with_an_embedded_stack(tmp_path):
    """An image, a mesh and a missing file: one JSON object each, the SDFs load
    in Drake, the missing file is an input error, the exit code says one failed."""
    from geomgen.geometry.drake_check import validate_sdf

    image, mesh = SAMPLES / "chair.png", SAMPLES / "table.glb"
    out = tmp_path / "out"
    result = geomgen("generate", str(image), str(mesh), str(tmp_path / "missing.png"), "--out", str(out),
                     "--collision", "hull", "--mass-kg", "2.5", "--sdf-workers", "1", "--json", "--timeout", "60")
    assert result.returncode == 1, result.stderr
    rows = {row["index"]: row for row in json_lines(result.stdout)}
    assert sorted(rows) == [0, 1, 2]
    for index, backend in ((0, "silhouette"), (1, "mesh")):
        row = rows[index]
        assert row["status"] == "ok", row
        assert set(row) >= {"index", "input", "status", "glb_path", "sdf_path", "stage", "error", "seconds"}
        assert row["backend"] == backend and row["seconds"] > 0
        assert Path(row["glb_path"]).stat().st_size > 0
        assert validate_sdf(Path(row["sdf_path"]))["mass_kg"] == pytest.approx(2.5)
    assert rows[0]["sdf_path"] == str(out / "chair" / "chair.sdf")
    assert rows[2]["status"] == "error" and rows[2]["stage"] == "input" and "missing.png" in rows[2]["error"]
    assert "backend(s) used: mesh, silhouette" in result.stderr


def test_demo_runs_the_pipeline_on_the_bundled_samples(tmp_path):
    out = tmp_path / "demo"
    result = geomgen("demo", "--out", str(out), "--collision", "hull", timeout_s=180)
    assert result.returncode == 0, result.stdout + result.stderr
    samples = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".glb"))
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in ([p.name] for p in samples)]
    assert [row[0] for row in rows] == [p.name for p in samples]
    assert all(row[2] == "ok" for row in rows), result.stdout
    for sample in samples:
        assert (out / sample.stem / f"{sample.stem}.sdf").is_file()
    assert f"SDF packages in {out.resolve()}" in result.stdout


def test_convert_json(tmp_path):
    out = tmp_path / "assets"
    bogus = tmp_path / "notes.obj"
    bogus.write_text("this is not a mesh\n")
    result = geomgen("convert", str(SAMPLES / "table.glb"), str(bogus), "--out", str(out), "--collision", "hull",
                     "--material", "wood", "--json")
    assert result.returncode == 1, result.stderr
    rows = json_lines(result.stdout)
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert Path(rows[0]["sdf_path"]).is_file() and rows[0]["method"] == "hull" and rows[0]["mass_kg"] > 0
    assert rows[0]["collision_pieces"] == 1 and rows[1]["error"] and "notes.obj" in rows[1]["input"]


def test_convert_writes_a_preview_unless_told_not_to(tmp_path):
    with_preview = geomgen("convert", str(SAMPLES / "table.glb"), "--out", str(tmp_path / "a"), "--collision", "hull")
    without = geomgen("convert", str(SAMPLES / "table.glb"), "--out", str(tmp_path / "b"), "--collision", "hull",
                      "--no-preview")
    assert with_preview.returncode == 0 and without.returncode == 0, without.stderr
    assert (tmp_path / "a" / "table" / "preview.png").is_file()
    assert (tmp_path / "b" / "table" / "table.sdf").is_file() and not (tmp_path / "b" / "table" / "preview.png").exists()


def test_convert_into_a_relative_folder(tmp_path):
    """--out relative to the working folder: the package is named after the input and lands there."""
    done = subprocess.run([sys.executable, "-m", "geomgen", "convert", str(SAMPLES / "table.glb"), "--out", "assets",
                           "--collision", "hull", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert Path(json_lines(done.stdout)[0]["sdf_path"]) == tmp_path / "assets" / "table" / "table.sdf"
    assert (tmp_path / "assets" / "table" / "table.sdf").is_file()


def test_serve_stops_every_process_on_ctrl_c(tmp_path):
    """`geomgen serve` until SIGINT: the broker and its workers all exit."""
    from geomgen.client import GeometryClient

    port = free_base_port()
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "geomgen", "serve", "--backend", "mesh", "--sdf-workers", "1",
                              "--port", str(port), "--log-dir", str(tmp_path / "logs")], stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        with GeometryClient(f"127.0.0.1:{port}", timeout_s=30) as client:
            def ready():
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    stats = client.health(timeout_s=1.0)
                except TransportError:  # the broker is not bound yet
                    return None
                return stats if stats["backends"]["mesh"]["alive"] and stats["sdf_slots"] else None

            stats = wait_for(ready, timeout_s=60, interval_s=0.2, what="serve ready")
        pids = [w["pid"] for w in stats["workers"]] + [w["pid"] for w in stats["sdf_workers"]]
        assert len(pids) == 2
        wait_for(lambda: "serving on" in (tmp_path / "serve.log").read_text(), timeout_s=30, what="serve's banner")
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=30) == 0
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout_s=10, what="children gone")
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        log.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_names_a_worker_that_cannot_start(tmp_path):
    server = GeometryServer(backends=["mesh", "sam3d"], sdf_workers=0, base_port=0, gpus=[], log_dir=tmp_path)
    try:
        server.start()
        with pytest.raises(TransportError, match="gpu-worker-sam3d exited") as caught:
            server.wait_until_ready(60)
        assert "sam3d" in str(caught.value).split("ends with:")[1], "the error carries the tail of the worker's log"
        assert str(tmp_path / "gpu-worker-sam3d.log") in str(caught.value)
    finally:
        server.stop()
    assert not server.children


def test_progress_line_counts_states():
    import io

    from geomgen.batch import GeometryEvent, GeometryResult
    from geomgen.progress import Progress

    stream = io.StringIO()
    progress = Progress(3, stream=stream, enabled=True)
    for event in [GeometryEvent(0, "queued"), GeometryEvent(1, "generating"), GeometryEvent(2, "glb_ready"),
                  GeometryEvent(0, "final", result=GeometryResult(0, None, ok=False))]:
        progress.update(event)
    assert progress.line().startswith("[1/3 done (1 failed)] 1 generating, 1 converting")
    progress.close()
    assert stream.getvalue().startswith("\r[") and stream.getvalue().endswith("\r")
    assert not Progress(1, stream=io.StringIO()).enabled, "silent when not a terminal"


class GpuSlowBackend(SlowBackend):
    """The test suite's slow backend, flagged as a GPU backend so the launcher
    starts one worker per GPU (registered below through GEOMGEN_BACKENDS)."""

    name = "gpuslow"
    uses_gpu = True


def test_server_starts_one_worker_per_gpu(tmp_path, monkeypatch):
    """Two GPUs listed by nvidia-smi (a script printing its `-L` format; this
    machine has none): two workers, each seeing only its own GPU."""
    from geomgen.client import GeometryClient, GeometryRequest

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)'\n"
                   "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("GEOMGEN_BACKENDS", "gpuslow=tests.test_cli:GpuSlowBackend")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    server = GeometryServer(backends=["gpuslow"], sdf_workers=0, base_port=0, backend_options={"delay_s": "0.5"})
    assert server.expected_workers() == {"gpuslow": 2}
    with server:
        assert sorted(w["gpu"] for w in server.wait_until_ready(30)["workers"]) == ["0", "1"]
        mesh = SAMPLES / "table.glb"
        requests = [GeometryRequest(image_path=mesh, output_dir=tmp_path / "out", output_filename=f"m{i}",
                                    backend="gpuslow", want_sdf=False) for i in range(2)]
        with GeometryClient(server.address, timeout_s=30) as client:
            results = dict(client.generate(requests))
    assert all(r.ok for r in results.values()), [r.error for r in results.values()]
    assert not server.log_dir.exists(), "the temporary log folder of a clean run is removed"
    seen = sorted(r.info["generate"]["cuda_visible_devices"] for r in results.values())
    assert seen == ["0", "1"], "each worker runs with CUDA_VISIBLE_DEVICES set to its own GPU"


def test_generate_writes_other_formats_and_says_what_to_look_at(tmp_path):
    """--format mjcf and urdf beside the SDF (paths in the JSON), --height sizes an
    image, and without a size the terminal says the default size was used."""
    out = tmp_path / "out"
    done = geomgen("generate", str(SAMPLES / "chair.png"), "--out", str(out), "--collision", "hull", "--format", "mjcf",
                   "--format", "urdf", "--height", "0.9", "--json", timeout_s=300)
    assert done.returncode == 0, done.stderr
    row = json_lines(done.stdout)[0]
    assert Path(row["mjcf_path"]).name == "chair.xml" and Path(row["urdf_path"]).name == "chair.urdf"
    assert Path(row["mjcf_path"]).is_file() and Path(row["urdf_path"]).is_file() and "warnings" in row
    report = json.loads((out / "chair" / "chair.json").read_text())
    assert report["bbox_m"][2] == pytest.approx(0.9, rel=1e-3)
    assert "no --height" not in done.stderr
    unsized = geomgen("generate", str(SAMPLES / "chair.png"), "--out", str(tmp_path / "unsized"), "--collision", "hull",
                      "--no-sdf", timeout_s=300)
    assert unsized.returncode == 0, unsized.stderr
    assert "images carry no scale" in unsized.stderr and "--height" in unsized.stderr


def test_convert_prints_warnings_and_other_formats(tmp_path):
    big = tmp_path / "big.glb"
    import trimesh

    box = trimesh.creation.box(extents=(20.0, 20.0, 20.0))  # a 20 m cube: a unit mistake, most likely
    box.apply_translation((0, 10.0, 0))
    big.write_bytes(box.export(file_type="glb"))
    done = geomgen("convert", str(big), "--out", str(tmp_path / "out"), "--collision", "hull", "--format", "urdf")
    assert done.returncode == 0, done.stderr
    assert "warning: the object is 20 m across" in done.stdout and "kg from" in done.stdout
    as_json = geomgen("convert", str(big), "--out", str(tmp_path / "out2"), "--collision", "hull", "--format", "urdf",
                      "--json")
    row = json_lines(as_json.stdout)[0]
    assert Path(row["urdf_path"]).is_file() and any("20 m across" in w for w in row["warnings"])
