"""Logs: with --log-format json every line a broker and its workers write on
stderr is one JSON object, and each line about a job carries its job_id, so a
job can be followed across processes; `geomgen serve` keeps its log folder
(named at start, its processes logging in the format serve was given) after a
clean stop."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from geomgen import conversion, convert_child
from geomgen.client import GeometryClient
from geomgen.contract import ConvertOptions
from tests.conftest import REPO, free_base_port, wait_for
from tests.test_convert import box_glb

SAMPLES = REPO / "src" / "geomgen" / "samples"
FIELDS = {"time", "level", "logger", "role", "pid", "message"}
JOB = re.compile(r"\bjob ([0-9a-f]+-[0-9a-f]+-[0-9a-f]+)\b")  # the broker's job ids: PREFIX-NUMBER-RANDOM


def json_records(path: Path) -> list[dict]:
    """Every line of a log file, each of which must be one JSON object with the standard fields."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path.name} line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict) and FIELDS <= set(record), (path.name, number, line)
        records.append(record)
    return records


def job_ids_logged(records: list[dict]) -> set[str]:
    """The job ids of the records about one job, checking that each carries the id its message names."""
    ids = set()
    for record in records:
        found = JOB.search(record["message"])
        if found:
            assert record.get("job_id") == found.group(1), record
            ids.add(found.group(1))
    return ids


def stats_of(address: str) -> dict:
    try:
        with GeometryClient(address, timeout_s=2) as client:
            return client.health(1.0)
    except Exception:  # noqa: BLE001 - not up yet
        return {}


def test_json_logs_of_a_broker_and_its_workers_follow_one_job(procs, tmp_path):
    port = free_base_port()
    broker = f"127.0.0.1:{port}"
    procs.start("broker", "--port", str(port), "--log-format", "json", "--log-level", "debug")
    procs.start("gpu-worker", "--backend", "mesh", "--broker", broker, env={"GEOMGEN_LOG_FORMAT": "json"})
    config = tmp_path / "site.toml"
    config.write_text('[all]\nlog_format = "json"\n')
    procs.start("--config", str(config), "sdf-worker", "--broker", broker, name="sdf-worker")
    wait_for(lambda: (s := stats_of(f"tcp://{broker}")) and s["backends"].get("mesh", {}).get("alive")
             and s.get("sdf_slots", 0) >= 1, timeout_s=90, what="a mesh worker and an SDF slot")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "geomgen", "generate", str(SAMPLES / "table.glb"), "--out", str(out),
                             "--broker", broker, "--collision", "hull", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    procs.stop_all()
    logs = {proc.log_path.name.split("-")[0]: json_records(proc.log_path) for proc in procs.procs}
    assert sorted(logs) == ["broker", "gpu", "sdf"]
    assert {r["role"] for r in logs["broker"]} == {"broker"}
    assert {r["role"] for r in logs["gpu"]} == {"gpu-worker"}
    assert {r["role"] for r in logs["sdf"]} == {"sdf-worker"}
    jobs = {name: job_ids_logged(records) for name, records in logs.items()}
    assert len(jobs["broker"]) == 1 and jobs["broker"] == jobs["gpu"] == jobs["sdf"], jobs
    assert any(r["level"] == "debug" for r in logs["broker"]) and not any(r["level"] == "debug" for r in logs["gpu"])


def test_text_is_the_default_format(procs):
    port = free_base_port()
    proc = procs.start("broker", "--port", str(port))
    wait_for(lambda: "listening" in proc.log_path.read_text(), timeout_s=60, what="the broker's first line")
    line = proc.log_path.read_text().splitlines()[-1]
    assert not line.startswith("{") and " geomgen.broker INFO broker " in line


def test_serve_keeps_its_log_folder_after_a_clean_stop(tmp_path):
    """The format comes from a config file whose [all] also names peer keys for this host's
    workers: serve's own processes log in serve's format and ignore the file's keys."""
    state = tmp_path / "state"
    stderr_path = tmp_path / "serve.err"
    site = tmp_path / "site.toml"
    site.write_text('[all]\nlog_format = "json"\nkey = "no/such.key_secret"\nbroker_key = "no/such/broker.key"\n')
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(state), "GEOMGEN_CONFIG": str(site)}
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "geomgen", "serve", "--backend", "mesh", "--sdf-workers", "1",
                                 "--port", "0"], stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        wait_for(lambda: proc.poll() is not None or "serving on" in stderr_path.read_text(), timeout_s=120,
                 what="serve's banner")
        assert proc.poll() is None, stderr_path.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, stderr_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    messages = [r["message"] for r in json_records(stderr_path)]
    assert messages[0].startswith("geomgen: logs in "), messages
    folder = Path(messages[0].removeprefix("geomgen: logs in "))
    assert folder.parent == state / "geomgen" / "logs" and folder.name.startswith("serve-")
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["broker.log", "gpu-worker-mesh.log", "sdf-worker.log"], names
    for name in names:
        records = json_records(folder / name)  # serve passed its format on
        assert records and {r["role"] for r in records} <= {"broker", "gpu-worker", "sdf-worker"}, name
    assert any("broker stopped" == r["message"] for r in json_records(folder / "broker.log"))


def test_a_worker_that_cannot_start_says_why_in_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "geomgen", "gpu-worker", "--backend", "no-such-backend",
                             "--broker", f"127.0.0.1:{free_base_port()}", "--log-format", "json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    path = tmp_path / "stderr"
    path.write_text(result.stderr)
    errors = [r for r in json_records(path) if r["level"] == "error"]
    assert len(errors) == 1 and "unknown backend 'no-such-backend'" in errors[0]["message"], result.stderr


def test_a_conversion_started_again_logs_its_job_id(tmp_path, caplog):
    """CoACD dies in native code (tests.plugins): the SDF worker's conversion starts
    again with V-HACD, and that line carries the job's id."""
    task = convert_child.glb_task(box_glb(), "b.glb", "coacd_crash", "tests.plugins:selectable_convert")
    with caplog.at_level(logging.WARNING, logger="geomgen.conversion"):
        outcome = conversion.drive(conversion.Conversion(tmp_path, task, ConvertOptions(), 120.0,
                                                         label="job abc-1-def", job_id="abc-1-def"))
    assert outcome["info"]["method"] == "vhacd"
    again = [r for r in caplog.records if "starting again" in r.getMessage()]
    assert len(again) == 1 and again[0].job_id == "abc-1-def"
