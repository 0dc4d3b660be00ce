"""The job life cycle on a Dispatcher without sockets: messages go in as the
broker loop would decode them, with explicit timestamps, and what it sends
comes out of a RecordingOutbox. No threads, no sleeps: a timeout is a
housekeeping call at a later ``now``. The socket loop and the wire are
tests/test_broker.py's."""

from __future__ import annotations

import itertools

import pytest

from geomgen import defaults
from geomgen.dispatch import Dispatcher
from geomgen.protocol import (
    BrokerHeartbeat,
    ClientRequest,
    Command,
    Disconnect,
    Event,
    Job,
    JobProgress,
    JobResult,
    Result,
    SdfJob,
    SdfResult,
    SdfStatus,
    WorkerHeartbeat,
    WorkerReady,
)
from geomgen.stats import health_report

from .peers import RecordingOutbox, kinds

INTERVAL_S = 1.0
LIVENESS = 3
DEAD_AFTER_S = INTERVAL_S * LIVENESS  # a worker silent for longer is lost
ADDRESS = "broker-host:5555"
SETTINGS = {"broker_id": "b" * 32, "address": ADDRESS, "heartbeat_interval_s": INTERVAL_S,
            "heartbeat_liveness": LIVENESS, "max_retries": 2, "no_worker_timeout_s": 10.0, "sdf_lease_s": 5.0,
            "known_backends": ["fake"]}
CLIENT = b"client"
W1, W2, W3 = b"w1", b"w2", b"w3"


def dispatcher(**settings) -> tuple[Dispatcher, RecordingOutbox]:
    """A Dispatcher started at time 0 with SETTINGS (overridable), and its outbox."""
    out = RecordingOutbox()
    return Dispatcher(out, **{**SETTINGS, **settings}, now=0.0), out


def request(d: Dispatcher, request_id: str = "r1", now: float = 0.0, client: bytes = CLIENT, **fields) -> None:
    fields = {"backend": "fake", "input_name": f"{request_id}.png", "input_data": b"image-bytes",
              "output_name": "thing", **fields}
    d.request(client, ClientRequest(request_id=request_id, **fields), now)


def ready(d: Dispatcher, identity: bytes, now: float, backend: str = "fake", **info) -> None:
    d.worker_message(identity, Command.READY, WorkerReady(identity.decode(), backend, "testhost", 1, info=info,
                                                          heartbeat_interval_s=INTERVAL_S), now)


def heartbeat(d: Dispatcher, identity: bytes, now: float, running: Job | None = None) -> None:
    beat = WorkerHeartbeat(identity.decode(), running.job_id if running else None, running.attempt if running else 0)
    d.worker_message(identity, Command.HEARTBEAT, beat, now)


def reply(d: Dispatcher, identity: bytes, job: Job, now: float, ok: bool = True, glb: bytes = b"GLB",
          error: dict | None = None, **fields) -> None:
    """The GPU worker ``identity`` answers ``job``; it spent 0.5 s on it by its own clock."""
    result = JobResult(job.job_id, job.attempt, ok, glb if ok else None, error, 0.5, **fields)
    d.worker_message(identity, Command.FINAL, result, now)


def sdf_status(d: Dispatcher, worker_id: str, now: float, slots: int = 1, free: int | None = None,
               held: list | None = None, command: Command = Command.HEARTBEAT) -> None:
    held = held or []
    free = slots - len(held) if free is None else free
    d.sdf_message(command, SdfStatus(worker_id, slots, free, held, "testhost", 2, heartbeat_interval_s=INTERVAL_S),
                  now)


def sdf_reply(d: Dispatcher, worker_id: str, job: SdfJob, now: float, ok: bool = True,
              error: dict | None = None) -> None:
    files = {f"{job.name}/{job.name}.sdf": b"<sdf/>"} if ok else {}
    sdf_file = f"{job.name}/{job.name}.sdf" if ok else None
    d.sdf_message(Command.FINAL, SdfResult(worker_id, job.job_id, job.attempt, ok, files, sdf_file,
                                           {"method": "hull"}, error, 0.25), now)


def final(out: RecordingOutbox, request_id: str = "r1", client: bytes = CLIENT) -> tuple[list[Event], Result]:
    """(events, result) ``client`` got about ``request_id``: exactly one FINAL, after every event."""
    mine = [msg for to, msg in out.sent if to == client and msg.request_id == request_id]
    out.sent = [(to, msg) for to, msg in out.sent if not (to == client and msg.request_id == request_id)]
    results = [msg for msg in mine if isinstance(msg, Result)]
    assert len(results) == 1 and mine[-1] is results[0], f"expected one FINAL last for {request_id}: {mine}"
    return mine[:-1], results[0]


def no_final(out: RecordingOutbox, request_id: str = "r1", client: bytes = CLIENT) -> bool:
    return not any(to == client and isinstance(msg, Result) and msg.request_id == request_id for to, msg in out.sent)


def timings(result: Result, *keys: str) -> dict:
    return {key: result.timings.get(key) for key in keys}


# --- routing ------------------------------------------------------------------------------------


def test_a_request_is_routed_to_a_worker_and_its_glb_comes_back():
    d, out = dispatcher()
    request(d, "r1", now=1.0, want_sdf=False, prompt="a chair")
    assert out.take(W1, Job) == []
    ready(d, W1, 2.0)  # the request waited 1 s for a worker
    job = out.take_one(W1, Job)
    assert (job.attempt, job.backend, job.input_name, job.input_data, job.prompt) == (
        1, "fake", "r1.png", b"image-bytes", "a chair")
    d.worker_message(W1, Command.PARTIAL, JobProgress(job.job_id, job.attempt, "shape done"), 3.0)
    reply(d, W1, job, 5.0, glb=b"THE-GLB", info={"faces": 12}, debug_files={"mask.png": b"M"})
    events, result = final(out)
    assert kinds(events) == ["queued", "generating", "progress", "glb_ready"]
    assert events[1].worker == "w1" and events[2].detail == "shape done"
    assert events[3].glb == b"THE-GLB" and events[3].worker == "w1"
    assert result.ok and result.attempts == 1 and result.files == {} and result.sdf_file is None
    assert result.info["generate"] == {"faces": 12} and result.info["debug_files"] == {"mask.png": b"M"}
    assert timings(result, "queue_wait_s", "generate_s", "worker_generate_s", "total_s") == {
        "queue_wait_s": 1.0, "generate_s": 3.0, "worker_generate_s": 0.5, "total_s": 4.0}


def test_a_glb_goes_through_the_sdf_pool_and_the_package_comes_back():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    sdf_status(d, "s1", 0.0, command=Command.READY)
    request(d, "r1", now=1.0, convert={"mass_kg": 2.0})
    reply(d, W1, out.take_one(W1, Job), 2.0, glb=b"G")
    sdf_job = out.take_one("sdf", SdfJob)
    assert (sdf_job.attempt, sdf_job.glb, sdf_job.name, sdf_job.convert["mass_kg"]) == (1, b"G", "thing", 2.0)
    sdf_reply(d, "s1", sdf_job, 5.0)
    events, result = final(out)
    assert kinds(events) == ["queued", "generating", "glb_ready", "converting"]
    assert result.ok and result.sdf_file == "thing/thing.sdf" and result.files == {"thing/thing.sdf": b"<sdf/>"}
    assert result.info["method"] == "hull"
    assert timings(result, "generate_s", "sdf_wait_s", "convert_s", "worker_convert_s", "total_s") == {
        "generate_s": 1.0, "sdf_wait_s": 0.0, "convert_s": 3.0, "worker_convert_s": 0.25, "total_s": 4.0}


def test_scenes_are_served_in_strict_round_robin():
    d, out = dispatcher()
    for i in range(6):
        request(d, f"A{i}", scene_id="A", want_sdf=False)
    for i in range(2):
        request(d, f"B{i}", scene_id="B", want_sdf=False)
    ready(d, W1, 1.0)  # one worker: the dispatch order is the scheduling order
    order = []
    for n in range(8):
        job = out.take_one(W1, Job)
        order.append(job.input_name.split(".")[0])
        reply(d, W1, job, 2.0 + n)
    assert order == ["A0", "B0", "A1", "B1", "A2", "A3", "A4", "A5"]
    assert all(final(out, name)[1].ok for name in order)


def test_requests_without_a_scene_take_turns_per_client():
    d, out = dispatcher()
    for i in range(3):
        request(d, f"a{i}", client=b"alice", want_sdf=False)
    request(d, "b0", client=b"bob", want_sdf=False)
    ready(d, W1, 1.0)
    order = []
    for n in range(4):
        job = out.take_one(W1, Job)
        order.append(job.input_name.split(".")[0])
        reply(d, W1, job, 2.0 + n)
    assert order == ["a0", "b0", "a1", "a2"]


def test_a_worker_error_is_forwarded_to_the_client():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "r1")
    error = {"stage": "input", "code": "bad_image", "message": "the image is truncated"}
    reply(d, W1, out.take_one(W1, Job), 1.0, ok=False, error=error)
    events, result = final(out)
    assert not result.ok and result.error == error
    assert "glb_ready" not in kinds(events) and out.take("sdf") == []


def test_a_worker_success_without_a_glb_is_a_generate_error():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "r1")
    reply(d, W1, out.take_one(W1, Job), 1.0, glb=b"")
    _, result = final(out)
    assert (result.error["stage"], result.error["code"]) == ("generate", "generate_failed")


def test_a_duplicate_request_id_in_flight_is_ignored():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "r1", want_sdf=False)
    job = out.take_one(W1, Job)
    out.sent.clear()
    request(d, "r1", now=1.0, want_sdf=False)  # re-sent while in flight: ignored
    assert out.sent == []
    request(d, "r1", now=1.0, client=b"other", want_sdf=False)  # the same id from another client is another request
    assert kinds(out.take(b"other", Event)) == ["queued"]
    reply(d, W1, job, 2.0)
    second = out.take_one(W1, Job)
    assert second.job_id != job.job_id
    reply(d, W1, second, 3.0)
    assert final(out, "r1")[1].ok and final(out, "r1", client=b"other")[1].ok
    assert d.stats.accepted == 2 and d.stats.completed == 2


# --- failures of GPU workers -----------------------------------------------------------------------


def test_a_silent_workers_job_is_retried_and_its_late_result_dropped():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "r1", want_sdf=False)
    first = out.take_one(W1, Job)
    ready(d, W2, 1.0)
    d.housekeeping(DEAD_AFTER_S - 0.1)  # W1 is quiet, not yet lost
    assert out.take(W2, Job) == []
    heartbeat(d, W2, DEAD_AFTER_S)
    d.housekeeping(DEAD_AFTER_S + 0.1)
    second = out.take_one(W2, Job)
    assert (second.job_id, second.attempt) == (first.job_id, 2)
    reply(d, W1, first, DEAD_AFTER_S + 0.2, glb=b"LATE")  # the superseded attempt answers after all
    assert out.take_one(W1, Disconnect).reason  # the broker no longer knows W1: it should send READY again
    reply(d, W2, second, DEAD_AFTER_S + 0.3, glb=b"FRESH")
    events, result = final(out)
    assert kinds(events) == ["queued", "generating", "retrying", "generating", "glb_ready"]
    assert events[-1].glb == b"FRESH" and result.ok and result.attempts == 2


def test_a_worker_that_disconnects_mid_job_has_its_job_rerun():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "r1", want_sdf=False)
    first = out.take_one(W1, Job)
    d.worker_message(W1, Command.DISCONNECT, Disconnect("shutdown", "w1"), 1.0)
    ready(d, W2, 2.0)
    second = out.take_one(W2, Job)
    assert (second.job_id, second.attempt) == (first.job_id, 2)
    reply(d, W2, second, 3.0)
    events, result = final(out)
    assert "retrying" in kinds(events) and result.ok


def test_a_job_whose_worker_cannot_be_reached_goes_to_another_uncounted():
    d, out = dispatcher(max_retries=0)
    ready(d, W1, 0.0)
    out.unreachable.add(W1)  # its connection closed before the job could be sent
    ready(d, W2, 0.0)
    request(d, "r1", want_sdf=False)
    job = out.take_one(W2, Job)
    assert job.attempt == 1
    reply(d, W2, job, 1.0)
    assert final(out)[1].ok  # with max_retries 0 a counted loss would have failed it


def test_a_stale_attempt_from_a_live_worker_is_dropped():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "r1", want_sdf=False)
    job = out.take_one(W1, Job)
    d.worker_message(W1, Command.FINAL, JobResult(job.job_id, job.attempt + 5, True, b"WRONG"), 1.0)
    assert no_final(out)
    reply(d, W1, job, 2.0, glb=b"RIGHT")
    events, result = final(out)
    assert [e.glb for e in events if e.event == "glb_ready"] == [b"RIGHT"] and result.ok
    assert d.stats.stale_results == 1


def test_a_job_fails_with_worker_lost_after_max_retries():
    d, out = dispatcher(max_retries=2)
    ready(d, W1, 0.0)
    request(d, "r1", want_sdf=False)
    assert out.take_one(W1, Job).attempt == 1
    ready(d, W2, 1.0)
    heartbeat(d, W2, DEAD_AFTER_S)
    d.housekeeping(DEAD_AFTER_S + 0.5)  # W1 went silent: hung
    second = out.take_one(W2, Job)
    assert second.attempt == 2
    heartbeat(d, W2, 4.0, second)
    ready(d, W3, 4.0)
    out.unreachable.add(W2)  # W2 was killed: the heartbeat it is owed finds the connection closed
    d.housekeeping(DEAD_AFTER_S + 0.5 + INTERVAL_S)
    assert out.take_one(W3, Job).attempt == 3
    d.worker_message(W3, Command.DISCONNECT, Disconnect("killed", "w3"), 6.0)
    events, result = final(out)
    assert kinds(events).count("retrying") == 2
    assert not result.ok and (result.error["stage"], result.error["code"]) == ("transport", "worker_lost")
    assert "3 times" in result.error["message"]


def test_a_busy_refusal_requeues_without_counting():
    d, out = dispatcher(max_retries=0)
    ready(d, W1, 0.0)
    request(d, "r1", want_sdf=False)
    job = out.take_one(W1, Job)
    busy = {"stage": "transport", "code": "busy", "message": "busy"}
    d.worker_message(W1, Command.FINAL, JobResult(job.job_id, job.attempt, False, None, busy), 1.0)
    assert no_final(out)
    ready(d, W2, 2.0)
    again = out.take_one(W2, Job)
    assert (again.job_id, again.attempt) == (job.job_id, 1)
    reply(d, W2, again, 3.0)
    _, result = final(out)
    assert result.ok and result.attempts == 1  # with max_retries 0 a counted loss would have failed it


def test_a_worker_busy_with_a_job_the_broker_did_not_give_gets_work_once_idle():
    d, out = dispatcher()
    ready(d, W1, 0.0, running_job=["from-an-earlier-broker", 1])  # this broker restarted under it
    request(d, "r1", want_sdf=False, now=1.0)
    assert out.take(W1, Job) == []
    heartbeat(d, W1, 2.0, Job("from-an-earlier-broker", 1, "fake", "x.png", b""))
    assert out.take(W1, Job) == []
    heartbeat(d, W1, 3.0)  # idle now
    assert out.take_one(W1, Job).input_name == "r1.png"


def test_a_worker_that_reports_a_job_it_was_not_given_gets_no_work_until_idle():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    heartbeat(d, W1, 1.0, Job("someone-elses", 1, "fake", "x.png", b""))
    request(d, "r1", want_sdf=False, now=2.0)
    assert out.take(W1, Job) == []
    heartbeat(d, W1, 3.0)
    assert out.take_one(W1, Job).input_name == "r1.png"


def test_a_worker_that_reconnects_mid_job_keeps_its_job():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "r1", want_sdf=False)
    job = out.take_one(W1, Job)
    new_connection = b"w1-again"
    d.worker_message(new_connection, Command.READY,
                     WorkerReady("w1", "fake", "testhost", 1, info={"running_job": [job.job_id, job.attempt]},
                                 heartbeat_interval_s=INTERVAL_S), 1.0)
    reply(d, new_connection, job, 2.0)
    events, result = final(out)
    assert "retrying" not in kinds(events) and result.ok and result.attempts == 1


def test_an_unreadable_result_fails_the_job_it_ran():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "r1", want_sdf=False)
    out.take_one(W1, Job)
    d.worker_result_unreadable(W1, "missing field 'ok'", 1.0)
    _, result = final(out)
    assert result.error["code"] == "protocol" and "missing field 'ok'" in result.error["message"]
    request(d, "r2", want_sdf=False, now=2.0)
    assert out.take_one(W1, Job).input_name == "r2.png"  # the worker is free again


def test_an_unknown_worker_is_told_to_reconnect():
    d, out = dispatcher()
    heartbeat(d, W1, 0.0)  # heartbeats without READY, as after a broker restart
    assert out.take_one(W1, Disconnect).reason
    d.worker_message(W1, Command.DISCONNECT, Disconnect("bye", "w1"), 1.0)
    assert out.sent == []  # a departing stranger is not answered


# --- waiting for workers -------------------------------------------------------------------------


def test_the_no_worker_timeout_names_the_backend_and_the_command():
    d, out = dispatcher()
    request(d, "r1", no_worker_timeout_s=2.0)
    d.housekeeping(1.9)
    assert no_final(out)
    d.housekeeping(2.0)
    events, result = final(out)
    assert kinds(events) == ["queued"]
    assert (result.error["stage"], result.error["code"]) == ("transport", "no_worker")
    assert f"geomgen gpu-worker --backend fake --broker {ADDRESS}" in result.error["message"]
    assert "2 s" in result.error["message"]


def test_busy_workers_keep_requests_waiting_past_the_timeout():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "r1", want_sdf=False)
    first = out.take_one(W1, Job)
    request(d, "r2", want_sdf=False, no_worker_timeout_s=1.0)
    heartbeat(d, W1, 2.5, first)
    d.housekeeping(2.5)
    assert no_final(out, "r2")  # r2 outlives its 1 s wait: the pool has a worker, only busy
    reply(d, W1, first, 3.0)
    reply(d, W1, out.take_one(W1, Job), 4.0)
    assert final(out, "r1")[1].ok and final(out, "r2")[1].ok


def test_a_request_parked_behind_busy_workers_gets_a_full_wait_once_the_last_worker_is_lost():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "r1", want_sdf=False, no_worker_timeout_s=20.0)
    request(d, "r2", want_sdf=False, no_worker_timeout_s=1.0)
    d.housekeeping(2.0)  # r2's wait ran out with W1 busy: parked
    d.worker_message(W1, Command.DISCONNECT, Disconnect("shutdown", "w1"), 2.5)
    d.housekeeping(3.4)
    assert no_final(out, "r2")
    d.housekeeping(3.5)  # 1 s after the pool emptied
    assert final(out, "r2")[1].error["code"] == "no_worker"
    assert no_final(out, "r1")


def test_sdf_jobs_wait_for_an_sdf_worker_then_fail_clearly():
    d, out = dispatcher(no_worker_timeout_s=3.0)
    ready(d, W1, 0.0)
    request(d, "r1")
    reply(d, W1, out.take_one(W1, Job), 1.0)
    heartbeat(d, W1, 3.9)
    d.housekeeping(3.9)
    assert no_final(out)
    d.housekeeping(4.0)  # 3 s after the GLB was ready
    events, result = final(out)
    assert kinds(events)[-1] == "glb_ready"
    assert result.error["code"] == "no_worker" and f"geomgen sdf-worker --broker {ADDRESS}" in result.error["message"]


# --- bad requests ------------------------------------------------------------------------------------


def test_an_unknown_backend_lists_what_is_available():
    d, out = dispatcher()
    ready(d, W1, 0.0, backend="plugin")
    request(d, "r1", backend="nope")
    events, result = final(out)
    assert events == [] and (result.error["stage"], result.error["code"]) == ("input", "unknown_backend")
    assert "fake" in result.error["message"] and "plugin" in result.error["message"]
    request(d, "r2", backend="plugin", want_sdf=False)  # a backend a worker registered is accepted
    assert out.take_one(W1, Job).input_name == "r2.png"


@pytest.mark.parametrize("fields, code, named", [
    ({"convert": {"mass_kg": -1}}, "bad_option", "mass_kg"),
    ({"convert": {"colour": "red"}}, "bad_option", "colour"),
    ({"request_id": ""}, "bad_request", "request_id"),
    ({"input_data": b""}, "bad_request", "empty"),
    ({"no_worker_timeout_s": -1.0}, "bad_request", "no_worker_timeout_s"),
])
def test_bad_fields_get_an_input_error(fields, code, named):
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, **{"request_id": "r1", **fields})
    events, result = final(out, fields.get("request_id", "r1"))
    assert events == [] and not result.ok and result.attempts == 0
    assert (result.error["stage"], result.error["code"]) == ("input", code)
    assert named in result.error["message"]
    assert out.take(W1, Job) == []


# --- SDF pool --------------------------------------------------------------------------------------


def glb_ready(d: Dispatcher, out: RecordingOutbox, request_id: str, now: float) -> None:
    """``request_id`` is generated at ``now`` (on a GPU worker that registers for it): its GLB waits for the
    SDF pool."""
    ready(d, f"gpu-{request_id}".encode(), now)
    request(d, request_id, now=now)
    [(gpu, job)] = [(to, msg) for to, msg in out.sent if isinstance(msg, Job) and msg.input_name == f"{request_id}.png"]
    out.take(gpu, Job)
    reply(d, gpu, job, now)


def test_an_sdf_job_is_pushed_only_while_the_pool_has_credit():
    d, out = dispatcher()
    sdf_status(d, "s1", 0.0, slots=1, free=0, command=Command.READY)
    glb_ready(d, out, "r1", 1.0)
    assert out.take("sdf") == []  # no free slot, no push
    sdf_status(d, "s1", 2.0, slots=1)
    first = out.take_one("sdf", SdfJob)
    glb_ready(d, out, "r2", 3.0)
    assert out.take("sdf") == []  # the slot the first push took is not reported yet, but it counts
    sdf_status(d, "s1", 3.5, slots=1, held=[[first.job_id, 1]])
    assert out.take("sdf") == []
    sdf_reply(d, "s1", first, 4.0)
    sdf_status(d, "s1", 4.0, slots=1)
    assert out.take_one("sdf", SdfJob).name == "thing"
    assert final(out, "r1")[1].ok


def test_an_sdf_job_waits_while_no_pipe_has_room():
    d, out = dispatcher()
    sdf_status(d, "s1", 0.0, slots=2, command=Command.READY)
    out.sdf_room = False  # the worker has not read its pipe yet
    glb_ready(d, out, "r1", 1.0)
    assert out.take("sdf") == []
    out.sdf_room = True
    d.housekeeping(1.5)
    assert out.take_one("sdf", SdfJob).attempt == 1


def test_an_sdf_lease_is_renewed_by_held_reports():
    d, out = dispatcher(sdf_lease_s=2.0)
    sdf_status(d, "s1", 0.0, command=Command.READY)
    glb_ready(d, out, "r1", 0.0)
    job = out.take_one("sdf", SdfJob)
    for now in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):  # three leases long
        sdf_status(d, "s1", now, held=[[job.job_id, job.attempt]])
        d.housekeeping(now + 0.5)
    assert out.take("sdf") == []
    sdf_reply(d, "s1", job, 7.0)
    events, result = final(out)
    assert "retrying" not in kinds(events) and result.ok and result.attempts == 1


def test_an_expired_sdf_lease_repushes_the_job_and_drops_the_stale_result():
    d, out = dispatcher(sdf_lease_s=2.0)
    sdf_status(d, "s1", 0.0, slots=2, command=Command.READY)
    glb_ready(d, out, "r1", 0.0)
    first = out.take_one("sdf", SdfJob)
    sdf_status(d, "s1", 1.0, slots=2)  # it never says it holds the job
    d.housekeeping(1.9)
    assert out.take("sdf") == []
    d.housekeeping(2.0)
    second = out.take_one("sdf", SdfJob)
    assert (second.job_id, second.attempt) == (first.job_id, 2)
    sdf_reply(d, "s1", first, 2.5)  # superseded attempt: dropped
    assert no_final(out)
    sdf_reply(d, "s1", second, 3.0)
    events, result = final(out)
    assert "retrying" in kinds(events) and result.ok and result.attempts == 2


def test_an_sdf_job_fails_with_worker_lost_after_max_repushes():
    d, out = dispatcher(sdf_lease_s=2.0, max_retries=1)
    sdf_status(d, "s1", 0.0, slots=3, command=Command.READY)
    glb_ready(d, out, "r1", 0.0)
    attempts = [out.take_one("sdf", SdfJob).attempt]
    for now in (1.0, 2.0, 3.0, 4.0):
        sdf_status(d, "s1", now, slots=3)
        d.housekeeping(now)
        attempts += [job.attempt for job in out.take("sdf", SdfJob)]
    assert attempts == [1, 2]
    _, result = final(out)
    assert (result.error["stage"], result.error["code"]) == ("convert", "worker_lost")


def test_a_silent_sdf_workers_job_goes_to_another():
    d, out = dispatcher(sdf_lease_s=60.0)
    sdf_status(d, "s1", 0.0, command=Command.READY)
    glb_ready(d, out, "r1", 0.0)
    first = out.take_one("sdf", SdfJob)
    sdf_status(d, "s1", 0.5, held=[[first.job_id, 1]])
    sdf_status(d, "s2", 1.0, command=Command.READY)  # s1 holds the job, then dies
    d.housekeeping(DEAD_AFTER_S + 0.4)
    assert out.take("sdf") == []
    sdf_status(d, "s2", DEAD_AFTER_S + 0.6)
    d.housekeeping(DEAD_AFTER_S + 0.6)  # s1 lost: the lease of what it held runs out now
    second = out.take_one("sdf", SdfJob)
    assert (second.job_id, second.attempt) == (first.job_id, 2)
    sdf_reply(d, "s2", second, 5.0)
    _, result = final(out)
    assert result.ok and result.attempts == 2


def test_a_frozen_sdf_worker_gets_no_new_job_before_its_leases_run_out():
    """s1 (2 slots, one job held) freezes: no status from 0.5 s on. The next GLB
    goes to s2 at once, not into the frozen worker's socket, though s1's last
    status still shows a free slot and its lease has a minute to go; once s1 is
    declared lost, what it held goes to s2 too."""
    d, out = dispatcher(sdf_lease_s=60.0)
    sdf_status(d, "s1", 0.0, slots=2, command=Command.READY)
    glb_ready(d, out, "r1", 0.0)
    first = out.take_one("sdf", SdfJob)
    sdf_status(d, "s1", 0.5, slots=2, held=[[first.job_id, 1]])
    sdf_status(d, "s2", 0.5, slots=1, command=Command.READY)
    for t in (1.5, 2.0, 2.5):
        sdf_status(d, "s2", t, slots=1)
        d.housekeeping(t)
    glb_ready(d, out, "r2", 2.6)  # s1 quiet for 2.1 intervals: bypassed
    second = out.take_one("sdf", SdfJob)
    assert out.sdf_to[-1] == "s2"
    sdf_status(d, "s2", 3.0, slots=1, held=[[second.job_id, 1]])
    sdf_reply(d, "s2", second, 3.2)
    sdf_status(d, "s2", 3.2, slots=1)
    d.housekeeping(DEAD_AFTER_S + 0.6)  # s1 lost: what it held goes to s2 now, not after 60 s
    resent = out.take_one("sdf", SdfJob)
    assert (resent.job_id, resent.attempt, out.sdf_to[-1]) == (first.job_id, 2, "s2")
    assert out.sdf_to == ["s1", "s2", "s2"]


def test_an_sdf_worker_that_disconnects_hands_its_jobs_back():
    d, out = dispatcher(sdf_lease_s=60.0)
    sdf_status(d, "s1", 0.0, command=Command.READY)
    sdf_status(d, "s2", 0.0, slots=1, free=0, command=Command.READY)
    glb_ready(d, out, "r1", 0.0)
    first = out.take_one("sdf", SdfJob)
    sdf_status(d, "s1", 0.5, held=[[first.job_id, 1]])
    d.sdf_message(Command.DISCONNECT, Disconnect("shutdown", "s1"), 1.0)
    sdf_status(d, "s2", 1.0)
    d.housekeeping(1.0)
    assert out.take_one("sdf", SdfJob).attempt == 2


def test_a_results_only_request_gets_glb_ready_and_final():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    sdf_status(d, "s1", 0.0, command=Command.READY)
    request(d, "r1", events=False)
    job = out.take_one(W1, Job)
    d.worker_message(W1, Command.PARTIAL, JobProgress(job.job_id, job.attempt, "shape done"), 0.5)
    reply(d, W1, job, 1.0, glb=b"THE-GLB")
    sdf_reply(d, "s1", out.take_one("sdf", SdfJob), 2.0)
    events, result = final(out)
    assert kinds(events) == ["glb_ready"] and events[0].glb == b"THE-GLB"
    assert result.ok


def test_an_sdf_job_handed_back_busy_is_pushed_again_uncounted():
    """A job sent on a stale status finds every slot taken; the worker answers
    "busy" and the broker sends the same attempt again, to whoever has credit."""
    d, out = dispatcher(max_retries=0)
    sdf_status(d, "s1", 0.0, command=Command.READY)
    glb_ready(d, out, "r1", 0.0)
    first = out.take_one("sdf", SdfJob)
    busy = {"stage": "convert", "code": "busy", "message": "no free conversion slot on this SDF worker"}
    sdf_reply(d, "s1", first, 1.0, ok=False, error=busy)
    again = out.take_one("sdf", SdfJob)
    assert (again.job_id, again.attempt) == (first.job_id, first.attempt)
    sdf_reply(d, "s1", again, 2.0)
    events, result = final(out)
    assert result.ok and result.attempts == 1 and "retrying" not in kinds(events)
    assert d.stats.failed == 0


def test_an_sdf_result_from_a_worker_the_job_was_not_sent_to_is_dropped():
    d, out = dispatcher()
    sdf_status(d, "s1", 0.0, command=Command.READY)
    sdf_status(d, "s2", 0.0, command=Command.READY)
    glb_ready(d, out, "r1", 0.0)
    job = out.take_one("sdf", SdfJob)
    holder = out.sdf_to[-1]
    stranger = "s2" if holder == "s1" else "s1"
    sdf_reply(d, stranger, job, 1.0)  # a forged or confused result: not the lease holder's
    assert no_final(out) and d.stats.stale_results == 1
    sdf_reply(d, holder, job, 2.0)
    assert final(out)[1].ok


def test_an_sdf_error_is_forwarded():
    d, out = dispatcher()
    sdf_status(d, "s1", 0.0, command=Command.READY)
    glb_ready(d, out, "r1", 0.0)
    error = {"stage": "convert", "code": "bad_mesh", "message": "the mesh has no faces"}
    sdf_reply(d, "s1", out.take_one("sdf", SdfJob), 1.0, ok=False, error=error)
    _, result = final(out)
    assert result.error == error


# --- cancel, client heartbeat, health ----------------------------------------------------------------


def test_cancel_answers_queued_and_running_requests_and_frees_the_worker():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    request(d, "run", want_sdf=False)
    running = out.take_one(W1, Job)
    request(d, "wait", want_sdf=False)
    request(d, "keep", want_sdf=False)
    d.cancel(CLIENT, ["run", "wait", "never-sent", 7], 1.0)
    assert final(out, "run")[1].error["code"] == "cancelled"
    assert final(out, "wait")[1].error["code"] == "cancelled"
    reply(d, W1, running, 2.0)  # discarded; the worker is free again
    assert no_final(out, "run")
    kept = out.take_one(W1, Job)
    assert kept.input_name == "keep.png"
    reply(d, W1, kept, 3.0)
    assert final(out, "keep")[1].ok
    assert d.stats.cancelled == 2


def test_cancel_while_converting_drops_the_sdf_result():
    d, out = dispatcher()
    sdf_status(d, "s1", 0.0, command=Command.READY)
    glb_ready(d, out, "r1", 0.0)
    job = out.take_one("sdf", SdfJob)
    d.cancel(CLIENT, ["r1"], 1.0)
    assert final(out)[1].error["code"] == "cancelled"
    assert health(d, 1.0)["sdf_in_flight"] == 0
    sdf_reply(d, "s1", job, 2.0)
    assert no_final(out)


def test_a_client_heartbeat_learns_which_requests_the_broker_does_not_hold():
    d, _ = dispatcher()
    request(d, "held")
    request(d, "theirs", client=b"other")
    assert d.unknown(CLIENT, ["held", "lost", "theirs", 5]) == ["lost", "theirs"]


def health(d: Dispatcher, now: float) -> dict:
    """The health map as the broker assembles it, without its header."""
    return health_report(d.stats, now, header={}, backend_names=d.available_backends(), workers=list(d.workers),
                         sdf=d.sdf, queues=d.queues, job_states=[job.state.value for job in d.jobs.values()])


def test_health_reports_workers_queues_and_timings():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    sdf_status(d, "s1", 0.0, slots=3, command=Command.READY)
    request(d, "r1", want_sdf=False, now=1.0)
    reply(d, W1, out.take_one(W1, Job), 3.0)
    request(d, "r2", want_sdf=False, now=4.0)
    request(d, "r3", want_sdf=False, scene_id="kitchen", now=4.0)
    stats = health(d, 5.0)
    assert stats["uptime_s"] == 5.0 and stats["completed"] == 1 and stats["in_flight"] == 2
    assert stats["avg_generate_s"] == 2.0 and stats["avg_queue_wait_s"] == 0.0
    assert stats["backends"]["fake"]["completed"] == 1
    [worker] = stats["workers"]
    assert (worker["worker_id"], worker["busy"], worker["completed"], worker["last_seen_s"]) == ("w1", True, 1, 2.0)
    [sdf] = stats["sdf_workers"]
    assert (sdf["worker_id"], sdf["slots"]) == ("s1", 3) and stats["sdf_slots"] == 3 and stats["sdf_free"] == 3
    assert stats["queue_sizes"] == {"fake": 1} and stats["scenes"] == {"fake": ["kitchen"]}


# --- heartbeats and the activity log -----------------------------------------------------------------


def test_the_broker_heartbeats_each_worker_on_its_own_phase():
    """Workers that registered together are heartbeated spread over the interval,
    each once per interval, and a job counts as a heartbeat."""
    d, out = dispatcher()
    names = [f"w{n}".encode() for n in range(20)]
    for name in names:
        ready(d, name, 0.0)
    beats: dict[bytes, list[float]] = {name: [] for name in names}
    got_job = None
    for tick in range(1, 61):  # 3 s in 50 ms ticks
        now = tick * 0.05
        for name in names:
            heartbeat(d, name, now)  # they answer
        if tick == 20:
            request(d, "r1", want_sdf=False, now=now)
            got_job = next(to for to, msg in out.sent if isinstance(msg, Job))
        out.sent.clear()
        d.housekeeping(now)
        for to, msg in out.sent:
            if isinstance(msg, BrokerHeartbeat):
                beats[to].append(now)
    assert not any(1.0 < t < 1.95 for t in beats[got_job]), beats[got_job]  # the job at 1.0 s was its beat
    beats[got_job] = sorted([*beats[got_job], 1.0])
    first = sorted(times[0] for times in beats.values())
    assert 0.5 <= first[0] and first[-1] <= 1.05 and len(set(first)) > 5, first  # spread, not one burst
    for name, times in beats.items():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        shortest = 0.0 if name == got_job else 0.95  # the job came between two beats
        assert len(times) >= 3 and all(shortest <= gap <= 1.06 for gap in gaps), (name, times)


def test_activity_is_logged_once_per_period_not_per_job(caplog):
    caplog.set_level("INFO", logger="geomgen.broker")
    period_s = defaults.ACTIVITY_LOG_INTERVAL_S
    d, out = dispatcher()
    ready(d, W1, 0.0)
    for name in ("r1", "r2", "r3", "r4", "r5"):
        request(d, name, want_sdf=False)
    reply(d, W1, out.take_one(W1, Job), 1.0)  # r1 done in 1 s
    reply(d, W1, out.take_one(W1, Job), 3.0)  # r2 done in 3 s
    reply(d, W1, out.take_one(W1, Job), 5.0, ok=False, error={"code": "x"})  # r3 failed after 5 s
    caplog.clear()

    def housekeeping(now: float) -> list[str]:
        heartbeat(d, W1, now)  # W1 stays alive, running r4
        d.client_seen(CLIENT, now)  # and so does the client, waiting for r4 and r5
        d.housekeeping(now)
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("last ")]

    assert housekeeping(period_s / 2) == []  # not a period yet
    assert housekeeping(period_s + 1) == [
        f"last {period_s + 1:.0f} s: 2 done, 1 failed (mean 3.00 s per job); 2 in flight, 1 waiting in queues"]
    d.cancel(CLIENT, ["r4", "r5"], period_s + 2)
    housekeeping(2 * period_s + 2)  # the cancels were this period's work
    caplog.clear()
    assert housekeeping(3 * period_s + 3) == []  # an idle period says nothing


# --- the request contract at the broker ------------------------------------------------------


def test_options_accepted_before_any_declaration_are_checked_against_the_worker_before_it_sees_them():
    """A plug-in known only where its workers run: the broker learns its
    declaration at READY; a request accepted earlier with a misspelt option
    fails at dispatch and the worker never gets it."""
    d, out = dispatcher(known_backends=["plugin"])
    request(d, "bad", now=0.0, backend="plugin", want_sdf=False, backend_options={"delay": 1})
    request(d, "good", now=0.0, backend="plugin", want_sdf=False, backend_options={"plugin.delay_s": "2"})
    spec = [{"name": "delay_s", "kind": "number", "low": 0.0, "high": 60.0}]
    ready(d, W1, 1.0, backend="plugin", options=spec)
    _, result = final(out, "bad")
    assert result.error["code"] == "bad_option" and "delay" in result.error["message"]
    job = out.take_one(W1, Job)  # only the good one reached the worker, its option parsed
    assert job.input_name == "good.png" and job.backend_options == {"delay_s": 2.0}
    # Once declared, a bad option is refused at submission.
    request(d, "late", now=2.0, backend="plugin", backend_options={"delay_s": -1})
    assert final(out, "late")[1].error["code"] == "bad_option"


# --- deadlines ----------------------------------------------------------------------------------


def test_a_request_past_its_deadline_fails_wherever_it_is():
    d, out = dispatcher()
    request(d, "queued", now=0.0, want_sdf=False, deadline_s=5.0)
    d.housekeeping(5.5)
    _, result = final(out, "queued")
    assert (result.error["stage"], result.error["code"]) == ("transport", "timeout")
    assert "deadline of 5 s passed while it was queued" in result.error["message"]
    request(d, "running", now=6.0, want_sdf=False, deadline_s=5.0)
    ready(d, W1, 7.0)
    job = out.take_one(W1, Job)
    assert job.deadline_s == pytest.approx(4.0)  # what is left of the request's deadline
    heartbeat(d, W1, 10.0, running=job)
    d.housekeeping(11.5)
    assert final(out, "running")[1].error["code"] == "timeout"
    reply(d, W1, job, 12.0)  # the worker's late answer is dropped; it is idle again
    request(d, "next", now=12.0, want_sdf=False)
    assert out.take_one(W1, Job).input_name == "next.png"


def test_an_attempt_past_its_deadline_fails_and_its_worker_gets_no_work_until_idle():
    d, out = dispatcher()
    ready(d, W1, 0.0, generate_timeout_s=10.0)
    request(d, "hung", now=0.0, want_sdf=False)
    job = out.take_one(W1, Job)
    assert job.deadline_s == 10.0
    for t in (4.0, 8.0, 12.0):  # the worker keeps heartbeating while its job hangs
        heartbeat(d, W1, t, running=job)
        d.housekeeping(t)
    assert no_final(out, "hung")  # its own deadline plus the liveness window have not passed
    heartbeat(d, W1, 13.5, running=job)
    d.housekeeping(13.5)
    _, result = final(out, "hung")
    assert (result.error["stage"], result.error["code"]) == ("generate", "timeout")
    request(d, "next", now=14.0, want_sdf=False)
    heartbeat(d, W1, 14.0, running=job)  # still stuck in the old job: no work
    assert out.take(W1, Job) == []
    heartbeat(d, W1, 15.0)  # it recycled its backend and is idle
    assert out.take_one(W1, Job).input_name == "next.png"


def test_a_quiet_gpu_worker_is_passed_over_for_one_that_is_heard():
    """W1 is idle but silent (frozen, alive on TCP) for over two intervals: the
    job goes to W2, which heartbeats, instead of waiting on W1 until it is lost."""
    d, out = dispatcher()
    ready(d, W1, 0.0)
    ready(d, W2, 0.1)
    heartbeat(d, W2, 2.0)
    request(d, "r1", now=2.5, want_sdf=False)
    assert out.take(W1, Job) == [] and out.take_one(W2, Job).input_name == "r1.png"
    heartbeat(d, W1, 2.6)  # heard again: it gets the next job
    request(d, "r2", now=2.7, want_sdf=False)
    assert out.take_one(W1, Job).input_name == "r2.png"


def test_a_worker_reloading_its_backend_gets_no_work_until_loaded():
    d, out = dispatcher()
    ready(d, W1, 0.0)
    d.worker_message(W1, Command.HEARTBEAT, WorkerHeartbeat("w1", None, 0, loading=True), 0.5)
    request(d, "r1", now=1.0, want_sdf=False)
    assert out.take(W1, Job) == []
    heartbeat(d, W1, 2.0)
    assert out.take_one(W1, Job).input_name == "r1.png"


# --- admission and client liveness ---------------------------------------------------------------


def test_a_request_over_the_limits_is_refused_busy_with_a_retry_hint():
    from geomgen.admission import Limits

    d, out = dispatcher(limits=Limits(max_jobs=10, max_bytes=10**6, max_client_jobs=2, max_client_bytes=10**6))
    for name in ("r1", "r2", "r3"):
        request(d, name, now=0.0, want_sdf=False)
    _, refused = final(out, "r3")
    assert (refused.error["code"], refused.attempts) == ("busy", 0)
    assert defaults.BUSY_RETRY_MIN_S <= refused.error["retry_after_s"] <= defaults.BUSY_RETRY_MAX_S
    request(d, "other", now=0.0, client=b"other-client", want_sdf=False)  # another client still fits
    assert no_final(out, "other", client=b"other-client")
    ready(d, W1, 1.0)
    reply(d, W1, out.take_one(W1, Job), 2.0)
    request(d, "r3", now=2.0, want_sdf=False)  # sent again once a job finished: accepted
    assert no_final(out, "r3")


def test_a_silent_clients_jobs_are_dropped_and_nothing_is_sent_to_it():
    d, out = dispatcher(client_liveness_s=5.0)
    ready(d, W1, 0.0)
    for i in range(4):
        request(d, f"r{i}", now=0.0)
    running = out.take_one(W1, Job)
    request(d, "alive", now=0.0, client=b"alive-client", want_sdf=False)
    for t in (2.0, 4.0, 6.0):
        heartbeat(d, W1, t, running=running)
        d.client_seen(b"alive-client", t)
        d.housekeeping(t)
    assert all(no_final(out, f"r{i}") for i in range(4))  # dropped without a word: nobody reads
    assert d.stats.clients_lost == 1 and d.stats.jobs_dropped == 4
    assert d.admission.client_jobs(CLIENT) == 0
    reply(d, W1, running, 6.5)  # the running job's result is discarded; the next client's job runs
    assert out.take_one(W1, Job).input_name == "alive.png"


def test_peer_declared_heartbeats_and_slots_are_clamped():
    """A GPU worker declaring a 1e9 s heartbeat, an SDF worker declaring 1000
    slots and a 1e9 s heartbeat: neither is alive forever, and a request still
    fails no_worker when nothing real serves it."""
    d, out = dispatcher(client_liveness_s=1e6)  # the client stays; the workers are what is tested
    d.worker_message(W1, Command.READY, WorkerReady("w1", "fake", "h", 1, heartbeat_interval_s=1e9), 0.0)
    request(d, "held", now=0.0, want_sdf=False)
    out.take_one(W1, Job)
    lost_at = defaults.PEER_HEARTBEAT_MAX_S * LIVENESS + 1.0  # silent past the clamped window
    d.housekeeping(lost_at)
    assert d.workers.alive("fake") == 0 and d.stats.backend("fake").lost == 1
    d.housekeeping(lost_at + SETTINGS["no_worker_timeout_s"] + 0.1)
    assert final(out, "held")[1].error["code"] == "no_worker"
    d.sdf_message(Command.READY, SdfStatus("stranger", 1000, 1000, [], "h", 2, heartbeat_interval_s=1e9), 200.0)
    assert d.sdf.slots == defaults.SDF_MAX_SLOTS
    d.housekeeping(200.0 + defaults.PEER_HEARTBEAT_MAX_S * LIVENESS + 1.0)
    assert "stranger" not in d.sdf.workers
