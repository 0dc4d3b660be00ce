"""Client liveness and bounded results, through real processes: a killed
client's work is dropped instead of run for nobody, a client that holds the
thread between results is kept, and results for a client that stops reading
are bounded and dropped rather than held forever."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

import zmq

from geomgen import GeometryClient, GeometryRequest, defaults, protocol
from tests.conftest import REPO, wait_for
from tests.plugins import box_glb

ENV = {"GEOMGEN_BACKENDS": "instant=tests.plugins:InstantBackend,slow=tests.plugins:SlowBackend",
       "PYTHONPATH": str(REPO)}


def _stack(procs, endpoints, backend: str, *broker_args: str, workers: int = 1, options=()):
    procs.start("broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port), *broker_args, env=ENV)
    for _ in range(workers):
        extra = [arg for option in options for arg in ("--backend-option", option)]
        procs.start("gpu-worker", "--backend", backend, "--broker", f"127.0.0.1:{endpoints.client_port}", *extra,
                    env=ENV)
    with GeometryClient(endpoints.client, timeout_s=30) as client:
        wait_for(lambda: client.health()["backends"].get(backend, {}).get("alive", 0) >= workers, timeout_s=60,
                 what=f"{workers} {backend} worker(s)")


def _health(endpoints) -> dict:
    with GeometryClient(endpoints.client, timeout_s=30) as client:
        return client.health()


def test_a_killed_clients_queued_jobs_are_dropped(procs, endpoints, tmp_path):
    """20 jobs of 1 s each on one worker; the client is killed once the first
    starts: the broker drops the rest within its liveness window, so the worker
    runs at most the jobs it had started, not 20."""
    _stack(procs, endpoints, "slow", "--client-liveness", "2")
    mesh = tmp_path / "box.glb"
    mesh.write_bytes(box_glb())
    script = textwrap.dedent(f"""
        from geomgen import GeometryClient, GeometryRequest
        # fresh: 20 runs of one input, not one run and 19 answers from the result cache
        requests = [GeometryRequest(image_path={str(mesh)!r}, output_dir={str(tmp_path / 'out')!r},
                                    output_filename=f"box_{{i}}", backend="slow", want_sdf=False, fresh=True)
                    for i in range(20)]
        queued, generating = 0, False
        with GeometryClient({endpoints.client!r}, timeout_s=60) as client:
            for event in client.generate_events(requests):
                queued += event.kind == "queued"
                generating = generating or event.kind == "generating"
                if queued == 20 and generating:  # the broker holds all 20 and runs the first
                    print("generating", flush=True)
                    queued += 1
        """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**ENV, "PATH": "/usr/bin:/bin"})
    try:
        assert child.stdout.readline().strip() == "generating"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    stats = wait_for(lambda: (lambda s: s if s["clients_lost"] == 1 else None)(_health(endpoints)), timeout_s=30,
                     what="the broker to notice the client is gone")
    # All but the few that ran before the window ran out are dropped unrun.
    assert stats["accepted"] == 20 and stats["jobs_dropped"] >= 16 and stats["admission"]["held_jobs"] == 0
    # The worker finishes what it had started (its result discarded) and runs nothing more.
    stats = wait_for(lambda: (lambda s: s if not s["workers"][0]["busy"] else None)(_health(endpoints)),
                     timeout_s=30, what="the worker to go idle")
    assert stats["workers"][0]["completed"] <= 4  # those that ran before the window ran out, and the last one
    # Every job the broker accepted is accounted for, none run twice.
    assert stats["completed"] + stats["jobs_dropped"] == 20


def test_a_client_that_holds_the_thread_between_results_is_kept(procs, endpoints, tmp_path):
    """The application takes twice the liveness window over each result; the
    client's pulse keeps its jobs alive and every item completes."""
    _stack(procs, endpoints, "instant", "--client-liveness", "1", options=["delay_s=0.2"])
    mesh = tmp_path / "box.glb"
    mesh.write_bytes(box_glb())
    requests = [GeometryRequest(image_path=mesh, output_dir=tmp_path / "out", output_filename=f"box_{i}",
                                backend="instant", want_sdf=False) for i in range(3)]
    results = []
    with GeometryClient(endpoints.client, timeout_s=30, max_in_flight=3) as client:
        for index, result in client.generate(requests):
            results.append(result)
            threading.Event().wait(2.0)  # the application's own work on this result
        stats = client.health()
    assert [r.ok for r in results] == [True, True, True]
    assert stats["clients_lost"] == 0 and stats["jobs_dropped"] == 0


def test_results_for_a_client_that_stops_reading_are_bounded(procs, endpoints, zctx):
    """A client sends 30 requests for 1 MiB GLBs, keeps heartbeating, and never
    reads: the broker queues a few messages for it, drops the rest with a
    count in health, and holds none of the jobs afterwards."""
    _stack(procs, endpoints, "instant", "--client-send-hwm", "4", workers=2)
    glb = box_glb() + b"\0" * (1 << 20)  # the instant backend returns a GLB input as is
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(endpoints.client)
    for i in range(30):
        sock.send_multipart(protocol.encode(protocol.ClientRequest(
            request_id=f"r{i}", backend="instant", input_name="box.glb", input_data=glb, output_name=f"box_{i}",
            want_sdf=False)))

    def drained() -> dict | None:
        sock.send_multipart(protocol.encode(protocol.ClientHeartbeat(request_ids=[])))  # alive, still not reading
        stats = _health(endpoints)
        return stats if stats["completed"] == 30 else None

    stats = wait_for(drained, timeout_s=60, interval_s=0.5, what="all 30 jobs done")
    assert stats["results_undelivered"] > 0
    assert stats["admission"]["held_jobs"] == 0 and stats["clients_lost"] == 0
    sock.close(0)


def test_a_frozen_sdf_worker_is_bypassed(procs, endpoints, tmp_path):
    """Two SDF workers, one frozen with SIGSTOP (alive on TCP, silent): the
    conversions go to the other one, none waits out a lease."""
    _stack(procs, endpoints, "instant")
    broker_arg = f"127.0.0.1:{endpoints.client_port}"
    frozen = procs.start("sdf-worker", "--broker", broker_arg, "--worker-id", "frozen", env=ENV)
    procs.start("sdf-worker", "--broker", broker_arg, "--worker-id", "healthy", env=ENV)
    mesh = tmp_path / "box.glb"
    mesh.write_bytes(box_glb())
    requests = [GeometryRequest(image_path=mesh, output_dir=tmp_path / "out", output_filename=f"box_{i}",
                                backend="instant", collision="hull") for i in range(6)]
    with GeometryClient(endpoints.client, timeout_s=60) as client:
        wait_for(lambda: client.health()["sdf_slots"] >= 2, timeout_s=60, what="two SDF workers")
        frozen.send_signal(signal.SIGSTOP)
        try:
            # Frozen and quiet for two heartbeat intervals: it gets no new job from now on.
            wait_for(lambda: any(w["worker_id"] == "frozen" and w["last_seen_s"] > 2.2
                                 for w in client.health()["sdf_workers"]), timeout_s=30, what="the worker quiet")
            results = dict(client.generate(requests))
            stats = client.health()
        finally:
            frozen.send_signal(signal.SIGCONT)
    assert all(r.ok for r in results.values()), [(r.error_code, r.error) for r in results.values() if not r.ok]
    assert stats["sdf_repushed"] == 0  # nothing sat in the frozen worker's socket until a lease ran out
    assert all(r.timings["total_s"] < defaults.SDF_LEASE_S for r in results.values())


def test_a_hung_backend_times_out_and_the_next_request_is_served(procs, endpoints, tmp_path):
    """A generate() that never returns: the worker abandons it at its deadline
    (FINAL timeout, not retried), reloads its backend and serves the next
    request; the client is answered instead of waiting forever."""
    env = {**ENV, "GEOMGEN_BACKENDS": "hanging=tests.plugins:HangingBackend"}
    broker_arg = f"127.0.0.1:{endpoints.client_port}"
    procs.start("broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port), env=env)
    procs.start("gpu-worker", "--backend", "hanging", "--broker", broker_arg, "--generate-timeout", "2", env=env)
    mesh = tmp_path / "box.glb"
    mesh.write_bytes(box_glb())

    def item(name: str, **options) -> GeometryRequest:
        return GeometryRequest(image_path=mesh, output_dir=tmp_path / "out", output_filename=name,
                               backend="hanging", want_sdf=False, backend_options=options)

    with GeometryClient(endpoints.client, timeout_s=30, max_in_flight=1) as client:
        wait_for(lambda: client.health()["backends"].get("hanging", {}).get("alive"), timeout_s=60,
                 what="the hanging worker")
        results = dict(client.generate([item("hung"), item("next", hang="no")]))
        stats = client.health()
    hung, after = results[0], results[1]
    assert (hung.stage, hung.error_code, hung.attempts) == ("generate", "timeout", 1)
    assert "deadline" in hung.error
    assert after.ok and after.info["generate"]["pid"]  # served by the reloaded backend process
    assert stats["retried"] == 0 and stats["completed"] == 1
