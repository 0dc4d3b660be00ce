"""Across machines: the broker on one host, workers and the client on another,
over a real (virtual) network. Two network namespaces joined by a veth pair
stand in for two machines; the broker binds 0.0.0.0 on the hub, everything
else connects to the hub's address and never to loopback. Needs root and
`ip netns` (the CI machine has both); skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from geomgen.geometry.drake_check import validate_sdf
from tests.conftest import REPO, wait_for

SAMPLES = REPO / "src" / "geomgen" / "samples"
HUB_ADDRESS = "192.0.2.1"  # TEST-NET-1: documentation addresses, only ever inside these namespaces
WORKER_ADDRESS = "192.0.2.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make network namespaces")
    tag = uuid.uuid4().hex[:6]
    hub, box = f"gg-hub-{tag}", f"gg-box-{tag}"
    try:
        _ip("netns", "add", hub)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.decode().strip()}")
    try:
        _ip("netns", "add", box)
        _ip("link", "add", f"gh{tag}", "type", "veth", "peer", "name", f"gb{tag}")
        _ip("link", "set", f"gh{tag}", "netns", hub)
        _ip("link", "set", f"gb{tag}", "netns", box)
        for ns, dev, address in ((hub, f"gh{tag}", HUB_ADDRESS), (box, f"gb{tag}", WORKER_ADDRESS)):
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield hub, box
    finally:
        for ns in (hub, box):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class HostProcesses:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, ns: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{ns}-{args[0]}-{len(self.procs)}.log", "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "geomgen", *args],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = Path(log.name)  # type: ignore[attr-defined]
        log.close()
        self.procs.append(proc)
        return proc

    def run(self, ns: str, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "geomgen", *args],
                              capture_output=True, text=True, timeout=timeout_s)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def host_procs(tmp_path):
    group = HostProcesses(tmp_path)
    yield group
    group.stop()


def test_broker_on_one_host_workers_and_client_on_another(two_hosts, host_procs, tmp_path):
    """With CURVE keys, as a broker facing a network must run: each peer with a
    key of its role, made by `geomgen keys`."""
    hub, box = two_hosts
    keys = tmp_path / "keys"
    for args in (["init", str(keys)], ["add", "gpu-worker", "gpu1", "--keys", str(keys)],
                 ["add", "sdf-worker", "cpu1", "--keys", str(keys)], ["add", "client", "me", "--keys", str(keys)]):
        done = subprocess.run([sys.executable, "-m", "geomgen", "keys", *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr

    def key(role: str, name: str) -> list[str]:
        return ["--key", str(keys / role / f"{name}.key_secret"), "--broker-key", str(keys / "broker.key")]

    broker = host_procs.start(hub, "broker", "--host", "0.0.0.0", "--keys", str(keys))
    host_procs.start(box, "gpu-worker", "--backend", "mesh", "--broker", HUB_ADDRESS, *key("gpu-workers", "gpu1"))
    host_procs.start(box, "gpu-worker", "--backend", "silhouette", "--broker", f"tcp://{HUB_ADDRESS}:5555",
                     *key("gpu-workers", "gpu1"))
    host_procs.start(box, "sdf-worker", "--broker", f"{HUB_ADDRESS}:5555", "--procs", "2", *key("sdf-workers", "cpu1"))
    client_key = key("clients", "me")

    def stack_ready():
        done = host_procs.run(box, "health", "--broker", HUB_ADDRESS, "--json", "--timeout", "2", *client_key,
                              timeout_s=30)
        if done.returncode != 0:
            return None
        stats = json.loads(done.stdout)
        alive = {name: b.get("alive", 0) for name, b in stats["backends"].items()}
        return stats if alive.get("mesh") and alive.get("silhouette") and stats["sdf_slots"] >= 2 else None

    stats = wait_for(stack_ready, timeout_s=90, interval_s=0.5, what="workers on the other host to register")
    assert broker.poll() is None
    assert {w["backend"] for w in stats["workers"]} == {"mesh", "silhouette"}
    assert all("worker_id" not in w and "job_id" not in w for w in stats["workers"])  # HEALTH names no peer

    out = tmp_path / "out"
    image = sorted(SAMPLES.glob("*.png"))[0]
    done = host_procs.run(box, "generate", str(SAMPLES / "table.glb"), str(image), "--out", str(out),
                          "--broker", HUB_ADDRESS, "--collision", "hull", "--json", *client_key)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [r["status"] for r in results] == ["ok", "ok"], results
    for result in results:
        validate_sdf(Path(result["sdf_path"]))
    # Without a key, the same command gets nothing from the broker: its handshake is refused.
    done = host_procs.run(box, "health", "--broker", HUB_ADDRESS, "--timeout", "2", timeout_s=30)
    assert done.returncode != 0 and "no answer from the broker" in done.stderr
