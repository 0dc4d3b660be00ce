"""protocol.py: round trips, and every way a peer's frames can be wrong."""

from __future__ import annotations

import msgpack
import pytest

from geomgen import protocol as p
from geomgen.endpoints import parse_broker
from geomgen.errors import InputError, ProtocolError


def _request(**kw):
    fields = dict(request_id="r1", backend="mesh", input_name="a.glb", input_data=b"\x00glb", output_name="a")
    fields.update(kw)
    return p.ClientRequest(**fields)


@pytest.mark.parametrize(
    "message, schema",
    [
        (_request(scene_id="kitchen", convert={"mass_kg": 2.0}), p.CLIENT_TO_BROKER),
        (p.Result(request_id="r1", ok=False, error=p.error_dict("input", "bad_image", "truncated")), p.BROKER_TO_CLIENT),
        (p.Event(request_id="r1", event=p.EventKind.GLB_READY.value, glb=b"glTF"), p.BROKER_TO_CLIENT),
        (p.Job(job_id="j", attempt=2, backend="mesh", input_name="a.obj", input_data=b"v"), p.BROKER_TO_WORKER),
        (p.JobResult(job_id="j", attempt=2, ok=True, glb=b"glTF", seconds=1.5), p.WORKER_TO_BROKER),
        (p.SdfJob(job_id="j", attempt=1, name="a", glb=b"glTF"), p.BROKER_TO_SDF),
        (p.SdfResult(worker_id="w", job_id="j", attempt=1, ok=True, files={"a/a.sdf": b"<sdf/>"}), p.SDF_TO_BROKER),
    ],
)
def test_round_trip(message, schema):
    command, decoded = p.decode(p.encode(message), schema)
    assert decoded == message
    assert command == p._DEFAULT_COMMAND[type(message)]


def test_sdf_status_travels_as_ready_or_heartbeat():
    status = p.SdfStatus(worker_id="w", slots=2, free=1, held=[["j", 1]])
    assert p.decode(p.encode(status), p.SDF_TO_BROKER)[0] is p.Command.READY
    command, decoded = p.decode(p.encode(status, p.Command.HEARTBEAT), p.SDF_TO_BROKER)
    assert command is p.Command.HEARTBEAT and decoded.held == [["j", 1]]


def test_header_carries_version_and_command():
    head = p.encode(_request())[0]
    assert head == b"GGP" + bytes((p.VERSION, p.Command.REQUEST))


BODY = msgpack.packb({"request_id": "r", "backend": "b", "input_name": "i", "input_data": b"", "output_name": "o"})


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([b"only one"], "expected 2 frames"),
        ([p.header(p.Command.REQUEST), BODY, b"extra"], "expected 2 frames"),
        ([b"HTTP/1.1", BODY], "not a geomgen message"),
        ([p.header(p.Command.REQUEST, version=9), BODY], "version 9"),
        ([b"GGP\x01\x63", BODY], "unknown command"),
        ([p.header(p.Command.PARTIAL), BODY], "not valid on this channel"),
        ([p.header(p.Command.REQUEST), b"\xc1\xc1"], "not valid msgpack"),
        ([p.header(p.Command.REQUEST), msgpack.packb([1, 2])], "must be a map"),
        ([p.header(p.Command.REQUEST), msgpack.packb({"request_id": "r"})], "missing field"),
        ([p.header(p.Command.REQUEST), msgpack.packb({1: 2})], "not valid msgpack"),
    ],
)
def test_bad_frames_raise_protocol_error(frames, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        p.decode(frames, p.CLIENT_TO_BROKER)


def test_wrong_types_are_named():
    body = msgpack.packb({"request_id": "r", "backend": "b", "input_name": "i", "input_data": "text", "output_name": "o"})
    with pytest.raises(ProtocolError, match=r"input_data: expected bytes, got str"):
        p.decode([p.header(p.Command.REQUEST), body], p.CLIENT_TO_BROKER)
    body = msgpack.packb({"request_id": "r", "backend": "b", "input_name": "i", "input_data": b"", "output_name": "o",
                          "no_worker_timeout_s": True})
    with pytest.raises(ProtocolError, match="no_worker_timeout_s"):
        p.decode([p.header(p.Command.REQUEST), body], p.CLIENT_TO_BROKER)


def test_oversized_body_is_refused_before_unpacking():
    with pytest.raises(ProtocolError, match="exceeds") as info:
        p.decode([p.header(p.Command.REQUEST), BODY], p.CLIENT_TO_BROKER, max_bytes=10)
    assert info.value.code == "too_large"


def test_unknown_fields_are_ignored_for_forward_compatibility():
    body = msgpack.packb({"request_id": "r", "backend": "b", "input_name": "i", "input_data": b"", "output_name": "o",
                          "from_the_future": 1})
    _, msg = p.decode([p.header(p.Command.REQUEST), body], p.CLIENT_TO_BROKER)
    assert msg.request_id == "r" and not hasattr(msg, "from_the_future")


@pytest.mark.parametrize(
    "address, host, base",
    [("hub", "hub", 5555), ("hub:6000", "hub", 6000), ("tcp://10.0.0.5:7000", "10.0.0.5", 7000), ("[::1]:6000", "::1", 6000)],
)
def test_broker_addresses(address, host, base):
    e = parse_broker(address)
    assert (e.host, e.client_port, e.worker_port, e.sdf_job_port, e.sdf_result_port) == (host, base, base + 1, base + 2, base + 3)


def test_broker_address_overrides_and_errors():
    assert parse_broker("hub", worker_port=7001, sdf_job_port=None).worker_port == 7001
    with pytest.raises(InputError, match="HOST:PORT"):
        parse_broker("http://hub/path")
