"""The Python client against scripted brokers: a real ROUTER socket on loopback,
run by a thread, that answers as a broker would (or stays silent). Client-side
checks, broker silence, re-sending what a restarted broker lost, duplicate
results, unsafe paths, backend=auto. The real broker is exercised in test_cli.py
and test_e2e.py."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
import zmq

from geomgen import GeometryClient, GeometryRequest, defaults, protocol
from geomgen.client import FINAL
from geomgen.errors import GenerateError, InputError, TransportError
from geomgen.protocol import Command
from tests.conftest import wait_for


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Small real input files: a PNG, a GLB, and broken ones."""
    import trimesh
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    png = io.BytesIO()
    Image.new("RGBA", (16, 16), (200, 30, 30, 255)).save(png, format="PNG")
    (root / "chair.png").write_bytes(png.getvalue())
    (root / "box.glb").write_bytes(trimesh.creation.box(extents=(0.2, 0.3, 0.1)).export(file_type="glb"))
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("neither an image nor a mesh\n")
    (root / "a_file").write_text("a file where a folder should be\n")
    with open(root / "huge.png", "wb") as huge:  # sparse: its size is read, its bytes never are
        huge.truncate(defaults.MAX_INPUT_BYTES + 1)
    return {p.name: p for p in root.iterdir()}


class FakeBroker:
    """A ROUTER bound on 127.0.0.1 and served by a thread. ``handler(command,
    message)`` returns the messages to send back to the client (or None)."""

    def __init__(self, ctx: zmq.Context, handler=None):
        self.handler = handler
        self.received: list[tuple[Command, object]] = []
        self._ctx = ctx
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._bound.wait(5), "fake broker did not bind"

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        self.port = sock.bind_to_random_port("tcp://127.0.0.1")
        self._bound.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                identity, frames = protocol.split_identity(sock.recv_multipart())
                command, message = protocol.decode(frames, protocol.CLIENT_TO_BROKER)
                self.received.append((command, message))
                for reply in (self.handler(command, message) if self.handler else None) or ():
                    sock.send_multipart([identity, *protocol.encode(reply)])
        finally:
            sock.close(linger=0)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def messages(self, cls: type) -> list:
        return [m for _, m in list(self.received) if isinstance(m, cls)]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def fake_broker(zctx):
    started: list[FakeBroker] = []

    def start(handler=None) -> FakeBroker:
        started.append(FakeBroker(zctx, handler))
        return started[-1]

    yield start
    for broker in started:
        broker.stop()


def package(stem: str) -> dict[str, bytes]:
    return {f"{stem}/{stem}.sdf": b"<sdf version='1.9'/>", f"{stem}/{stem}_collision_0.obj": b"v 0 0 0\n"}


def success(message: protocol.ClientRequest, backend: str = "mesh") -> list:
    """What a broker sends for a request that worked: glb_ready, then FINAL."""
    stem = message.output_name
    return [
        protocol.Event(message.request_id, "queued"),
        protocol.Event(message.request_id, "glb_ready", glb=b"glTF-bytes"),
        protocol.Result(message.request_id, ok=True, files=package(stem), sdf_file=f"{stem}/{stem}.sdf",
                        backend=backend, timings={"total_s": 0.1}),
    ]


def answer_requests(command, message):
    if command == Command.REQUEST:
        return success(message, message.backend)
    if command == Command.HEARTBEAT:
        return [protocol.BrokerHeartbeat("fake")]
    return None


def test_client_side_errors_are_per_item_and_never_sent(fake_broker, inputs, tmp_path):
    broker = fake_broker(answer_requests)
    out = tmp_path / "out"
    requests = [
        GeometryRequest(image_path=tmp_path / "missing.png", output_dir=out),
        GeometryRequest(image_path=inputs["empty.png"], output_dir=out),
        GeometryRequest(image_path=inputs["notes.txt"], output_dir=out),
        GeometryRequest(image_path=inputs["box.glb"], output_dir=inputs["a_file"]),
        GeometryRequest(image_path=inputs["box.glb"], output_dir=out, output_filename="../escape"),
        GeometryRequest(image_path=inputs["box.glb"], output_dir=out, mass_kg=-1.0),
        GeometryRequest(image_path=inputs["box.glb"], output_dir=out, backend="silhouette"),
        GeometryRequest(image_path=inputs["box.glb"], output_dir=out, output_filename="good", mass_kg=3.0),
        GeometryRequest(image_path=inputs["huge.png"], output_dir=out),
        GeometryRequest(image_path=tmp_path, output_dir=out),
        GeometryRequest(image_path=inputs["chair.png"], output_dir=out, output_filename="good.glb",
                        backend="silhouette"),
    ]
    with GeometryClient(broker.address, timeout_s=10) as client:
        results = dict(client.generate(requests))
    assert sorted(results) == list(range(len(requests)))
    codes = {i: (r.stage, r.error_code) for i, r in results.items() if not r.ok}
    assert codes == {
        0: ("input", "missing_file"),
        1: ("input", "empty_input"),
        2: ("input", "unknown_format"),
        3: ("input", "bad_output_dir"),
        4: ("input", "bad_name"),
        5: ("input", "bad_option"),
        6: ("input", "wrong_input_kind"),
        8: ("input", "too_large"),
        9: ("input", "unreadable"),
        10: ("input", "duplicate_output"),
    }
    assert "missing.png" in results[0].error and "mass_kg" in results[5].error
    good = results[7]
    assert good.ok and good.backend == "mesh"
    assert good.glb_path == out / "good.glb" and good.glb_path.read_bytes() == b"glTF-bytes"
    assert good.sdf_path == out / "good" / "good.sdf" and good.sdf_path.is_file()
    assert (out / "good" / "good_collision_0.obj").is_file()
    assert not (tmp_path / "escape.glb").exists()
    sent = broker.messages(protocol.ClientRequest)
    assert [m.output_name for m in sent] == ["good"], "only the valid item reaches the broker"
    assert sent[0].convert["mass_kg"] == 3.0 and sent[0].input_name == "box.glb"


def test_silent_broker_fails_outstanding_items_within_the_timeout(fake_broker, inputs, tmp_path):
    broker = fake_broker(handler=None)  # bound, reads everything, answers nothing
    requests = [GeometryRequest(image_path=inputs["box.glb"], output_dir=tmp_path, output_filename=f"b{i}")
                for i in range(3)]
    start = time.monotonic()
    with GeometryClient(broker.address, timeout_s=1.0, max_in_flight=2, heartbeat_interval_s=0.2) as client:
        results = dict(client.generate(requests))
    elapsed_s = time.monotonic() - start
    assert sorted(results) == [0, 1, 2]
    for result in results.values():
        assert not result.ok and result.stage == "transport" and result.error_code == "timeout"
        assert broker.address in result.error and "geomgen broker" in result.error
    assert elapsed_s < 4.0
    assert len(broker.messages(protocol.ClientRequest)) == 2  # max_in_flight, then the silence
    assert broker.messages(protocol.ClientHeartbeat), "the waiting client heartbeats"


def test_an_items_deadline_fails_it_even_while_the_broker_keeps_answering(fake_broker, inputs, tmp_path):
    def answer_heartbeats_only(command, message):
        if command == Command.HEARTBEAT and message.owner is None:
            return [protocol.BrokerHeartbeat("fake-broker", [])]  # alive, and holds everything
        return None

    broker = fake_broker(handler=answer_heartbeats_only)
    requests = [GeometryRequest(image_path=inputs["box.glb"], output_dir=tmp_path, output_filename="slow",
                                deadline_s=0.5),
                GeometryRequest(image_path=inputs["box.glb"], output_dir=tmp_path, output_filename="patient")]
    start = time.monotonic()
    with GeometryClient(broker.address, timeout_s=3.0, heartbeat_interval_s=0.1) as client:
        events = client.generate(requests)
        index, result = next(events)
        elapsed_s = time.monotonic() - start
        events.close()
    assert index == 0 and (result.stage, result.error_code) == ("transport", "timeout")
    assert "deadline of 0.5 s" in result.error and elapsed_s < 2.0  # not the 3 s silence timeout
    sent = broker.messages(protocol.ClientRequest)
    assert [m.deadline_s for m in sent] == [0.5, None]  # the broker enforces it too
    assert wait_for(lambda: any(sent[0].request_id in m.request_ids for m in broker.messages(protocol.Cancel)),
                    timeout_s=5, what="the late item cancelled at the broker")
    assert any(m.owner == client.identity for m in broker.messages(protocol.ClientHeartbeat)), "the pulse beats"


def test_health_against_a_silent_broker_raises(fake_broker):
    broker = fake_broker(handler=None)
    with GeometryClient(broker.address) as client:
        start = time.monotonic()
        with pytest.raises(TransportError, match="no answer from the broker"):
            client.health(timeout_s=0.5)
        assert time.monotonic() - start < 3.0


def test_unknown_ids_are_sent_again_and_a_second_final_is_dropped(fake_broker, inputs, tmp_path):
    """A broker that restarted reports the id unknown; the client re-sends the
    request; the broker's FINAL arrives twice; the client yields it once."""
    seen: list[str] = []

    def restarted_broker(command, message):
        if command == Command.HEARTBEAT:
            unknown = [rid for rid in message.request_ids if seen.count(rid) == 1]
            return [protocol.BrokerHeartbeat("new-broker", unknown=unknown)]
        if command == Command.REQUEST:
            seen.append(message.request_id)
            if seen.count(message.request_id) == 2:
                final = success(message)
                return [*final, final[-1], protocol.Result("not-mine", ok=True)]
        return None

    broker = fake_broker(restarted_broker)
    request = GeometryRequest(image_path=inputs["box.glb"], output_dir=tmp_path, collision="hull")
    with GeometryClient(broker.address, timeout_s=5, heartbeat_interval_s=0.1) as client:
        events = list(client.generate_events([request]))
        finals = [e for e in events if e.kind == FINAL]
        assert len(finals) == 1 and finals[0].result.ok, finals[0].result
        # the duplicate is still in flight when generate returns: a later batch ignores it
        again = dict(client.generate([GeometryRequest(image_path=inputs["box.glb"], output_dir=tmp_path / "2")]))
    assert len(again) == 1 and again[0].ok
    ids = [m.request_id for m in broker.messages(protocol.ClientRequest)]
    assert len(ids) == 4 and all(ids.count(rid) == 2 for rid in ids), "each id sent once, then once again"
    assert [e.kind for e in events] == ["queued", "glb_ready", FINAL]
    assert events[1].glb_path == tmp_path / "box.glb"


def test_broker_errors_and_unsafe_paths(fake_broker, inputs, tmp_path):
    def handler(command, message):
        if command != Command.REQUEST:
            return None
        rid, stem = message.request_id, message.output_name
        if stem == "gen_fails":
            error = protocol.error_dict("generate", "bad_image", "the image has no foreground object")
            return [protocol.Result(rid, ok=False, error=error, backend="silhouette")]
        files = {"../evil.sdf": b"x", f"{stem}/{stem}.sdf": b"<sdf/>"}
        return [protocol.Event(rid, "glb_ready", glb=b"glb"),
                protocol.Result(rid, ok=True, files=files, sdf_file=f"{stem}/{stem}.sdf")]

    broker = fake_broker(handler)
    out = tmp_path / "out"
    requests = [
        GeometryRequest(image_path=inputs["chair.png"], output_dir=out, output_filename="gen_fails",
                        backend="silhouette"),
        GeometryRequest(image_path=inputs["box.glb"], output_dir=out, output_filename="evil"),
    ]
    with GeometryClient(broker.address, timeout_s=5) as client:
        results = dict(client.generate(requests))
    assert (results[0].stage, results[0].error_code) == ("generate", "bad_image")
    with pytest.raises(GenerateError, match="no foreground"):
        results[0].raise_for_error()
    assert (results[1].stage, results[1].error_code) == ("transport", "unsafe_path")
    assert not (tmp_path / "evil.sdf").exists() and not (out / "evil").exists()


def test_auto_backend_asks_the_broker_for_live_gpu_workers(fake_broker, inputs, tmp_path):
    alive = {"hunyuan3d": {"alive": 0}, "sam3d": {"alive": 1}, "silhouette": {"alive": 1}}

    def handler(command, message):
        if command == Command.HEALTH:
            return [protocol.HealthReply({"backends": alive})]
        return answer_requests(command, message)

    broker = fake_broker(handler)
    requests = [GeometryRequest(image_path=inputs["chair.png"], output_dir=tmp_path, output_filename="img"),
                GeometryRequest(image_path=inputs["box.glb"], output_dir=tmp_path, output_filename="mesh")]
    with GeometryClient(broker.address, timeout_s=5) as client:
        results = dict(client.generate(requests))
        alive["sam3d"]["alive"] = 0
        fallback = dict(client.generate(requests[:1]))
    assert results[0].backend == "sam3d" and results[1].backend == "mesh"
    assert fallback[0].backend == "silhouette"
    sent = [(m.output_name, m.backend) for m in broker.messages(protocol.ClientRequest)]
    assert sorted(sent) == [("img", "sam3d"), ("img", "silhouette"), ("mesh", "mesh")]
    assert len(broker.messages(protocol.HealthQuery)) == 2  # once per batch, not per item


def test_leaving_early_cancels_outstanding_requests(fake_broker, inputs, tmp_path):
    def handler(command, message):
        return [protocol.Event(message.request_id, "queued")] if command == Command.REQUEST else None

    broker = fake_broker(handler)
    requests = [GeometryRequest(image_path=inputs["box.glb"], output_dir=tmp_path, output_filename=f"m{i}")
                for i in range(2)]
    with GeometryClient(broker.address, timeout_s=5) as client:
        events = client.generate_events(requests)
        assert next(events).kind == "queued"
        events.close()
        cancels = wait_for(lambda: broker.messages(protocol.Cancel), timeout_s=5, what="a CANCEL")
    assert cancels and sorted(cancels[0].request_ids) == sorted(m.request_id for m in
                                                                broker.messages(protocol.ClientRequest))


def test_glb_only_with_debug_files(fake_broker, inputs, tmp_path):
    """want_sdf=False ends at the GLB; debug files land in debug_folder, and a
    debug path leaving that folder is refused."""
    def handler(command, message):
        if command != Command.REQUEST:
            return None
        assert message.debug and not message.want_sdf
        rid = message.request_id
        debug = {"mask.png": b"png"} if message.output_name == "fine" else {"../../x.png": b"png"}
        return [protocol.Event(rid, "glb_ready", glb=b"glb"),
                protocol.Result(rid, ok=True, info={"debug_files": debug, "faces": 12})]

    broker = fake_broker(handler)
    debug_dir = tmp_path / "debug"
    requests = [GeometryRequest(image_path=inputs["box.glb"], output_dir=tmp_path / "out", output_filename=name,
                                want_sdf=False, debug_folder=debug_dir) for name in ("fine", "sneaky")]
    with GeometryClient(broker.address, timeout_s=5) as client:
        results = dict(client.generate(requests))
    fine, sneaky = results[0], results[1]
    assert fine.ok and fine.sdf_path is None and fine.glb_path.read_bytes() == b"glb"
    assert fine.info == {"faces": 12}
    assert (debug_dir / "mask.png").read_bytes() == b"png"
    assert not sneaky.ok and sneaky.error_code == "unsafe_path" and not (tmp_path / "x.png").exists()


def test_conversion_fields_are_checked_and_merged():
    request = GeometryRequest(image_path="a.png", output_dir=".", material="wood", dimensions=(1, 2, 3),
                              convert_options={"simplify_faces": 5000})
    options = request.convert_dict()
    assert options["material"] == "wood" and options["dimensions"] == [1.0, 2.0, 3.0]
    assert options["simplify_faces"] == 5000 and options["collision"] == "coacd"
    for bad, words in [
        (dict(mass_kg=float("nan")), "mass_kg"),
        (dict(material="unobtainium"), "unknown material"),
        (dict(collision="octree"), "collision must be one of"),
        (dict(mu=0.3, convert_options={"mu": 0.9}), "given twice"),
        (dict(convert_options={"colour": "red"}), "unknown conversion option"),
    ]:
        with pytest.raises(InputError, match=words):
            GeometryRequest(image_path="a.png", output_dir=".", **bad).convert_dict()


def test_a_package_written_again_leaves_no_stale_file(fake_broker, inputs, tmp_path):
    """A first run wrote three collision pieces, the second (collision hull)
    one: the package folder is swapped whole, so no old piece is left beside
    an SDF that names one."""
    pieces = iter([3, 1])

    def answer(command, message):
        if command != Command.REQUEST:
            return answer_requests(command, message)
        stem, count = message.output_name, next(pieces)
        files = {f"{stem}/{stem}.sdf": b"<sdf/>", **{f"{stem}/{stem}_collision_{i}.obj": b"v" for i in range(count)}}
        return [protocol.Event(message.request_id, "glb_ready", glb=b"glTF-bytes"),
                protocol.Result(message.request_id, ok=True, files=files, sdf_file=f"{stem}/{stem}.sdf")]

    broker = fake_broker(answer)
    request = GeometryRequest(image_path=inputs["box.glb"], output_dir=tmp_path, output_filename="box")
    for _ in range(2):
        with GeometryClient(broker.address, timeout_s=10) as client:
            assert dict(client.generate([request]))[0].ok
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["box.sdf", "box_collision_0.obj"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
