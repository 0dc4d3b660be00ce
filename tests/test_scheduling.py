"""Unit tests of the broker's bookkeeping: round-robin queues, no-worker waits,
the GPU worker registry and the SDF pool's credits and leases."""

from __future__ import annotations

import msgpack
import pytest

from geomgen.errors import InputError, Stage
from geomgen.backends.mesh import MeshBackend
from geomgen.jobs import AcceptedTerms, JobRecord, peek_request_id, peer_error, validate_request
from geomgen.protocol import ClientRequest, encode
from geomgen.scheduling import GpuWorkerRecord, RoundRobinQueue, WaitList, WorkerRegistry


def drain(queue: RoundRobinQueue) -> list[str]:
    out = []
    while (popped := queue.pop()) is not None:
        out.append(popped[1])
    return out


# --- RoundRobinQueue ------------------------------------------------------------


def test_round_robin_interleaves_scenes_like_the_old_scheduler():
    queue = RoundRobinQueue()
    for i in range(10):
        queue.push("A", f"a{i}")
    for i in range(2):
        queue.push("B", f"b{i}")
    assert len(queue) == 12
    assert drain(queue) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9"]
    assert len(queue) == 0 and queue.keys() == []


def test_new_scene_joins_rotation_at_the_end():
    queue = RoundRobinQueue()
    for item in ("a0", "a1", "a2"):
        queue.push("A", item)
    queue.push("B", "b0")
    assert queue.pop() == ("A", "a0")
    queue.push("C", "c0")  # arrives while A and B wait: served after both
    assert queue.keys() == ["B", "A", "C"]
    assert drain(queue) == ["b0", "a1", "c0", "a2"]


def test_push_front_puts_a_retry_first_in_its_scene():
    queue = RoundRobinQueue()
    queue.push("A", "a0")
    queue.push("A", "a1")
    queue.push("B", "b0")
    assert queue.pop() == ("A", "a0")
    queue.push_front("A", "a0")  # a0's worker died: it runs before a1
    assert drain(queue) == ["b0", "a0", "a1"]
    queue.push("B", "b1")
    queue.push_front("Z", "z0")  # a scene with no other work goes first
    assert drain(queue) == ["z0", "b1"]


def test_remove_takes_items_and_empty_scenes_out():
    queue = RoundRobinQueue()
    queue.push("A", "a0")
    queue.push("B", "b0")
    queue.push("B", "b1")
    assert queue.remove("A", "a0") is True
    assert queue.remove("A", "a0") is False
    assert queue.remove("C", "x") is False
    assert queue.keys() == ["B"] and len(queue) == 2
    assert sorted(queue) == ["b0", "b1"]
    assert drain(queue) == ["b0", "b1"]


# --- WaitList ---------------------------------------------------------------------


def test_wait_fails_only_without_live_workers_and_parks_otherwise():
    waits = WaitList()
    live = {"gpu": 0}
    waits.arm("j1", "gpu", 1.0, now=0.0)
    waits.arm("j2", "gpu", 1.0, now=0.0)
    assert waits.due(0.5, live.get) == []
    live["gpu"] = 1
    assert waits.due(1.0, live.get) == []  # workers exist (busy): both parked, not failed
    waits.cancel("j2")  # j2 got dispatched
    live["gpu"] = 0
    waits.pool_emptied("gpu", now=2.0)  # the last worker died: a new full wait for j1 only
    assert waits.due(2.9, live.get) == []
    assert waits.due(3.0, live.get) == [("j1", "gpu")]
    assert len(waits) == 0


def test_rearming_a_wait_supersedes_the_old_deadline():
    waits = WaitList()
    waits.arm("j", "gpu", 1.0, now=0.0)
    waits.arm("j", "gpu", 1.0, now=5.0)  # re-queued after a retry
    assert waits.due(2.0, lambda pool: 0) == []
    assert waits.due(6.0, lambda pool: 0) == [("j", "gpu")]


# --- WorkerRegistry -------------------------------------------------------------------


def test_registry_hands_out_idle_workers_in_order_and_tracks_alive():
    reg = WorkerRegistry()
    w1 = GpuWorkerRecord(b"i1", "w1", "mesh", last_seen=0.0)
    w2 = GpuWorkerRecord(b"i2", "w2", "mesh", last_seen=0.0)
    assert reg.add(w1) == [] and reg.add(w2) == []
    assert reg.alive("mesh") == 2 and reg.alive("other") == 0
    first = reg.take_idle("mesh")
    reg.assign(first, "job", 1, now=0.0)
    assert first is w1 and first.busy
    assert reg.take_idle("mesh") is w2
    assert reg.take_idle("mesh") is None
    reg.release(w1)
    assert reg.has_idle("mesh") and not w1.busy
    reg.block(w1)
    assert not reg.has_idle("mesh")
    reg.unblock(w1)
    assert reg.take_idle("mesh") is w1


def test_registry_replaces_a_worker_that_registers_again():
    reg = WorkerRegistry()
    old = GpuWorkerRecord(b"old", "w1", "mesh")
    reg.add(old)
    new = GpuWorkerRecord(b"new", "w1", "mesh")  # same worker_id on a new connection
    assert reg.add(new) == [old]
    assert reg.get(b"old") is None and reg.get(b"new") is new
    assert reg.alive("mesh") == 1


def test_registry_reports_silent_workers():
    reg = WorkerRegistry()
    reg.add(GpuWorkerRecord(b"a", "a", "mesh", last_seen=0.0))
    reg.add(GpuWorkerRecord(b"b", "b", "mesh", last_seen=0.9))
    assert [w.worker_id for w in reg.silent(now=1.2, liveness=5, interval_s=0.1)] == ["a"]
    # a worker that declared a longer interval than ours is judged by its own
    reg.add(GpuWorkerRecord(b"c", "c", "mesh", last_seen=0.0, heartbeat_interval_s=1.0))
    assert [w.worker_id for w in reg.silent(now=1.2, liveness=5, interval_s=0.1)] == ["a"]
    assert sorted(w.worker_id for w in reg.silent(now=5.2, liveness=5, interval_s=0.1)) == ["a", "b", "c"]


# --- request checks -----------------------------------------------------------------


def request(**fields) -> ClientRequest:
    base = dict(request_id="r1", backend="mesh", input_name="a.glb", input_data=b"x", output_name="a")
    return ClientRequest(**{**base, **fields})


@pytest.mark.parametrize(
    "fields, code",
    [
        ({"request_id": ""}, "bad_request"),
        ({"backend": ""}, "bad_request"),
        ({"output_name": ""}, "bad_name"),
        ({"output_name": "../up"}, "bad_name"),
        ({"output_name": "my chair"}, "bad_name"),
        ({"output_name": "-x"}, "bad_name"),
        ({"input_data": b""}, "bad_request"),
        ({"no_worker_timeout_s": -1.0}, "bad_request"),
        ({"no_worker_timeout_s": float("nan")}, "bad_request"),
        ({"convert": {"mass_kg": -2}}, "bad_option"),
        ({"convert": {"no_such_option": 1}}, "bad_option"),
        ({"convert": {"dimensions": "big"}}, "bad_option"),
        ({"convert": {"collision_params": {"thresold": 0.1}}}, "bad_option"),
        ({"convert": {"collision": "hull", "collision_params": {"threshold": 0.1}}}, "bad_option"),
        ({"backend": "nope"}, "unknown_backend"),
        ({"backend_options": {"unti": "mm"}}, "bad_option"),
        ({"backend_options": {"mesh.unit": "furlong"}}, "bad_option"),
    ],
)
def test_validate_request_names_the_bad_field(fields, code):
    with pytest.raises(InputError) as info:
        validate_request(request(**fields), lambda name: name == "mesh", lambda name: MeshBackend.options_spec)
    assert info.value.code == code and info.value.stage is Stage.INPUT
    assert len(info.value.message) > 10


def test_validate_request_returns_full_options():
    terms = validate_request(request(convert={"mass_kg": 2}, backend_options={"mesh.unit": "MM", "silhouette.x": 1}),
                             lambda name: True, lambda name: MeshBackend.options_spec)
    assert terms.convert["mass_kg"] == 2.0 and terms.convert["collision"] == "coacd"
    assert terms.backend_options == {"unit": "mm"} and terms.options_checked


def test_validate_request_leaves_undeclared_options_to_the_worker():
    terms = validate_request(request(backend_options={"anything": 1}), lambda name: True, lambda name: None)
    assert terms.backend_options == {"anything": 1} and not terms.options_checked


def test_peek_and_peer_error_helpers():
    frames = encode(request())
    assert peek_request_id(frames) == "r1"
    assert peek_request_id([frames[0], b"\xc1garbage"]) is None
    assert peek_request_id([frames[0], msgpack.packb({"request_id": 5})]) is None
    assert peer_error(None, Stage.CONVERT, "convert_failed", "fallback") == {
        "stage": "convert", "code": "convert_failed", "message": "fallback"}
    assert peer_error({"stage": "input", "code": "bad_image", "message": "m"}, Stage.GENERATE, "x", "y") == {
        "stage": "input", "code": "bad_image", "message": "m"}
    assert peer_error({"stage": "moon", "code": 3}, Stage.GENERATE, "x", "y")["stage"] == "generate"


def test_job_timings_are_rounded_seconds():
    job = JobRecord("j", b"c", request(), AcceptedTerms({}, {}, True), "s", accepted_at=10.0, no_worker_timeout_s=1.0)
    assert job.timings(11.0) == {"queue_wait_s": 1.0, "total_s": 1.0}
    job.dispatched_at, job.generate_s = 10.5, 0.25
    assert job.timings(12.0) == {"queue_wait_s": 0.5, "total_s": 2.0, "generate_s": 0.25}
