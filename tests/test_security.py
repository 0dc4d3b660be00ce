"""CURVE security through real processes over loopback: the pipeline with keys,
each refusal (no key, unknown key, wrong role, revoked key) with the pipeline
unaffected, the attacks of issue 10 written as tests, and the refusal to face
a network without keys."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from geomgen import GeometryClient, GeometryRequest, keys, protocol
from geomgen.geometry.drake_check import validate_sdf
from tests.conftest import REPO, wait_for
from tests.plugins import box_glb

SAMPLES = REPO / "src" / "geomgen" / "samples"
NO_ANSWER_S = 1.5  # how long a refused peer waits to be sure nothing comes back


@pytest.fixture
def key_dir(tmp_path):
    folder = tmp_path / "keys"
    keys.init_keys(folder)
    for role, name in (("client", "alice"), ("client", "mallory"), ("gpu-worker", "gpu1"), ("gpu-worker", "rogue"),
                       ("sdf-worker", "cpu1"), ("sdf-worker", "cpu2")):
        keys.add_peer(folder, role, name)
    return folder


def peer(key_dir: Path, role: str, name: str) -> keys.PeerKeys:
    return keys.load_peer_keys(key_dir / keys.ROLES[role] / f"{name}.key_secret", key_dir / "broker.key")


def key_args(key_dir: Path, role: str, name: str) -> list[str]:
    return ["--key", str(key_dir / keys.ROLES[role] / f"{name}.key_secret"), "--broker-key",
            str(key_dir / "broker.key")]


@pytest.fixture
def secure_stack(procs, endpoints, key_dir):
    """A broker with keys, a silhouette worker and an SDF worker, each with its role's key."""
    broker_arg = f"127.0.0.1:{endpoints.client_port}"
    broker = procs.start("broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port), "--keys",
                         str(key_dir))
    procs.start("gpu-worker", "--backend", "silhouette", "--broker", broker_arg, "--worker-id", "gpu-a",
                *key_args(key_dir, "gpu-worker", "gpu1"))
    procs.start("sdf-worker", "--broker", broker_arg, "--worker-id", "sdf-a", *key_args(key_dir, "sdf-worker", "cpu1"))
    with GeometryClient(endpoints.client, timeout_s=30, keys=peer(key_dir, "client", "alice")) as client:
        wait_for(lambda: client.health()["backends"].get("silhouette", {}).get("alive") and
                 client.health()["sdf_slots"], timeout_s=60, what="the workers, with their keys")
    return broker


def chair(tmp_path: Path, name: str = "chair") -> GeometryRequest:
    return GeometryRequest(image_path=SAMPLES / "chair.png", output_dir=tmp_path / "out", output_filename=name,
                           backend="silhouette", collision="hull")


def raw(zctx, endpoint: str, key: keys.PeerKeys | None = None, identity: bytes | None = None) -> zmq.Socket:
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if key is not None:
        keys.apply_client_curve(sock, key)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


def test_the_pipeline_runs_with_keys_and_health_names_no_peer(secure_stack, endpoints, key_dir, tmp_path):
    with GeometryClient(endpoints.client, timeout_s=60, keys=peer(key_dir, "client", "alice")) as client:
        results = dict(client.generate([chair(tmp_path)]))
        stats = client.health()
    assert results[0].ok, results[0].error
    validate_sdf(results[0].sdf_path)
    assert stats["workers"] and all("worker_id" not in w and "job_id" not in w for w in stats["workers"])
    assert all("worker_id" not in w for w in stats["sdf_workers"])
    assert all(isinstance(n, int) for n in stats["scenes"].values())


@pytest.mark.parametrize("who", ["no key", "unknown key", "a gpu-worker key", "revoked client key"])
def test_a_client_without_an_allowed_key_gets_nothing_and_the_pipeline_goes_on(
        who, secure_stack, endpoints, key_dir, zctx, tmp_path):
    if who == "unknown key":
        public, secret = zmq.curve_keypair()
        stranger = keys.PeerKeys(public, secret, keys.public_key_of(key_dir / "broker.key"))
    elif who == "a gpu-worker key":
        stranger = peer(key_dir, "gpu-worker", "rogue")
    elif who == "revoked client key":
        stranger = peer(key_dir, "client", "mallory")
        keys.revoke_peer(key_dir, "client", "mallory")
    else:
        stranger = None
    if who == "revoked client key":  # the broker re-reads a changed allow-list within about a second
        wait_for(lambda: not answered(zctx, endpoints.client, stranger), timeout_s=15, what="the revocation")
    assert not answered(zctx, endpoints.client, stranger), f"a client with {who} got an answer"
    # A key is refused (and logged, once) by the broker's ZAP handler; a peer with no key at all fails the
    # handshake before it (logged from the socket's monitor, when ZeroMQ reports the mechanism mismatch).
    said = {"no key": None, "unknown key": "on no allow-list", "a gpu-worker key": "a gpu-worker key, not a client key",
            "revoked client key": "on no allow-list"}[who]
    if said:
        wait_for(lambda: said in Path(secure_stack.log_path).read_text(), timeout_s=10, what=f"the refusal: {said}")
    with GeometryClient(endpoints.client, timeout_s=60, keys=peer(key_dir, "client", "alice")) as client:
        assert dict(client.generate([chair(tmp_path)]))[0].ok


def answered(zctx, endpoint: str, key: keys.PeerKeys | None) -> bool:
    """Whether a fresh connection with ``key`` gets an answer to HEALTH."""
    sock = raw(zctx, endpoint, key)
    try:
        sock.send_multipart(protocol.encode(protocol.HealthQuery()))
        return bool(sock.poll(NO_ANSWER_S * 1000))
    finally:
        sock.close(0)


def test_a_key_revoked_while_connected_is_cut_off(secure_stack, endpoints, key_dir):
    with GeometryClient(endpoints.client, timeout_s=2, keys=peer(key_dir, "client", "mallory")) as client:
        assert client.health()["status"] == "ok"
        keys.revoke_peer(key_dir, "client", "mallory")
        # The broker notices the allow-list changed within about a second, then drops its messages.
        wait_for(lambda: _no_health(client), timeout_s=15, interval_s=0.2, what="the revoked key to be refused")


def _no_health(client: GeometryClient) -> bool:
    try:
        client.health(timeout_s=0.5)
    except Exception:  # TransportError: no answer
        return True
    return False


def test_a_rogue_gpu_worker_without_a_worker_key_never_sees_a_job(secure_stack, endpoints, key_dir, zctx, tmp_path):
    """The attack: READY for backend silhouette from a stranger, to receive
    clients' inputs and return a forged GLB. With a client key it is refused
    at the handshake; the real worker serves the request."""
    rogue = raw(zctx, endpoints.worker, peer(key_dir, "client", "alice"))
    rogue.send_multipart(protocol.encode(protocol.WorkerReady("rogue", "silhouette", "evil", 1)))
    with GeometryClient(endpoints.client, timeout_s=60, keys=peer(key_dir, "client", "alice")) as client:
        result = dict(client.generate([chair(tmp_path)]))[0]
        stats = client.health()
    assert result.ok and stats["backends"]["silhouette"]["alive"] == 1
    assert not rogue.poll(100), "the rogue worker received something"
    rogue.close(0)


def test_a_worker_id_is_announced_or_disconnected_only_by_its_own_key(secure_stack, endpoints, key_dir, zctx, tmp_path):
    """The attack: READY and DISCONNECT under a real worker's id (learnt from
    HEALTH before) from another GPU-worker key, to evict it. Refused; the real
    worker stays and serves."""
    rogue = raw(zctx, endpoints.worker, peer(key_dir, "gpu-worker", "rogue"))
    rogue.send_multipart(protocol.encode(protocol.WorkerReady("gpu-a", "silhouette", "evil", 1)))
    command, reply = protocol.decode(rogue.recv_multipart(), protocol.BROKER_TO_WORKER) if rogue.poll(5000) else (
        None, None)
    assert command is protocol.Command.DISCONNECT and "another key" in reply.reason
    rogue.send_multipart(protocol.encode(protocol.Disconnect("bye", "gpu-a")))
    with GeometryClient(endpoints.client, timeout_s=60, keys=peer(key_dir, "client", "alice")) as client:
        result = dict(client.generate([chair(tmp_path)]))[0]
        stats = client.health()
    assert result.ok and stats["backends"]["silhouette"]["lost"] == 0 and stats["backends"]["silhouette"]["alive"] == 1
    rogue.close(0)


def test_forged_sdf_results_and_statuses_are_not_accepted(secure_stack, endpoints, key_dir, zctx, tmp_path):
    """The attack: push SDF statuses and results (a package with a file of the
    forger's choosing) in the real SDF worker's name. Without an SDF-worker key
    the push is refused at the handshake; with another SDF worker's key, every
    message in that name is dropped (and a result for a job its sender does not
    hold would be dropped too: tests/test_dispatch.py). The client gets the real
    package."""
    unkeyed = zctx.socket(zmq.PUSH)
    unkeyed.setsockopt(zmq.LINGER, 0)
    unkeyed.connect(endpoints.sdf_result)
    other = zctx.socket(zmq.PUSH)
    other.setsockopt(zmq.LINGER, 0)
    keys.apply_client_curve(other, peer(key_dir, "sdf-worker", "cpu2"))
    other.connect(endpoints.sdf_result)
    for sock in (unkeyed, other):
        status = protocol.SdfStatus("sdf-a", 1000, 1000, [], "evil", 1, heartbeat_interval_s=1e9)
        sock.send_multipart(protocol.encode(status, protocol.Command.HEARTBEAT))
        forged = protocol.SdfResult("sdf-a", "any-job", 1, True, {"x/x.sdf": b"<forged/>"}, "x/x.sdf", {})
        sock.send_multipart(protocol.encode(forged, protocol.Command.FINAL))
    with GeometryClient(endpoints.client, timeout_s=60, keys=peer(key_dir, "client", "alice")) as client:
        wait_for(lambda: client.health()["dropped_messages"] >= 2, timeout_s=10, what="the forgeries dropped")
        result = dict(client.generate([chair(tmp_path, "real")]))[0]
        stats = client.health()
    assert result.ok and (result.package_dir / "real.sdf").is_file() and not (tmp_path / "out" / "x").exists()
    assert stats["sdf_slots"] == 1  # the forged 1000 slots were never counted
    unkeyed.close(0)
    other.close(0)


def test_another_key_cannot_use_a_clients_identity(secure_stack, endpoints, key_dir, zctx, tmp_path):
    """The attack: with a client's identity (HEALTH showed it before), cancel
    its requests. From another key the cancel is dropped."""
    alice = GeometryClient(endpoints.client, timeout_s=60, keys=peer(key_dir, "client", "alice"))
    events = alice.generate_events([chair(tmp_path, "slow")])
    first = next(events)
    assert first.kind == "queued"
    thief = raw(zctx, endpoints.client, peer(key_dir, "client", "mallory"), identity=alice.identity)
    thief.send_multipart(protocol.encode(protocol.Cancel([f"{i}" for i in range(3)])))
    results = [e.result for e in events if e.kind == "final"]
    assert results[0].ok, (results[0].error_code, results[0].error)
    thief.close(0)
    alice.close()


def test_a_broker_off_loopback_refuses_to_start_without_keys(endpoints, tmp_path):
    done = subprocess.run([sys.executable, "-m", "geomgen", "broker", "--host", "0.0.0.0", "--port",
                           str(endpoints.client_port)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "without keys" in done.stderr and "geomgen keys init" in done.stderr and "--insecure" in done.stderr


def test_insecure_works_and_warns(procs, endpoints):
    broker = procs.start("broker", "--host", "0.0.0.0", "--port", str(endpoints.client_port), "--insecure")
    with GeometryClient(endpoints.client, timeout_s=30, keys=None) as client:
        assert wait_for(lambda: _health_or_none(client), timeout_s=30, what="the broker")["status"] == "ok"
    broker.send_signal(signal.SIGTERM)
    broker.wait(timeout=30)
    assert "INSECURE" in Path(broker.log_path).read_text()


def _health_or_none(client: GeometryClient):
    try:
        return client.health(timeout_s=1.0)
    except Exception:  # TransportError while the broker starts
        return None


def test_serve_with_keys_makes_keys_for_its_processes(tmp_path):
    from geomgen.server import GeometryServer

    folder = tmp_path / "serve-keys"
    with GeometryServer(backends=["mesh"], sdf_workers=1, base_port=0, keys_dir=folder) as server:
        assert (folder / "broker.key").is_file() and (folder / "clients" / "serve-client.key_secret").is_file()
        mesh = tmp_path / "box.glb"
        mesh.write_bytes(box_glb())
        request = GeometryRequest(image_path=mesh, output_dir=tmp_path / "out", backend="mesh", collision="hull")
        with GeometryClient(server.address, timeout_s=60, keys=server.client_keys) as client:
            assert dict(client.generate([request]))[0].ok
        with GeometryClient(server.address, timeout_s=2, keys=None) as stranger:
            assert _no_health(stranger)


def test_a_stranger_on_the_sdf_job_port_receives_no_glb(secure_stack, endpoints, key_dir, zctx, tmp_path):
    """The attack: connect to the SDF job port to receive clients' GLBs. Without
    an SDF-worker key (no key, or a client's) nothing arrives; the real SDF
    worker converts."""
    strangers = [raw(zctx, endpoints.sdf_job, None, identity=b"sdf-a"),
                 raw(zctx, endpoints.sdf_job, peer(key_dir, "client", "alice"), identity=b"sdf-b")]
    with GeometryClient(endpoints.client, timeout_s=60, keys=peer(key_dir, "client", "alice")) as client:
        assert dict(client.generate([chair(tmp_path)]))[0].ok
    assert not any(sock.poll(100) for sock in strangers)
    for sock in strangers:
        sock.close(0)
