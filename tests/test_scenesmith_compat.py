"""SceneSmith's old classes and command line, served by geomgen (issue 11,
sections 2 and 3), and GeometryClient's refusal of the old (host, port) call.

The client's wire behaviour (blank lines, retries, 4xx) runs against a small
HTTP stub in this file; the classes and `python -m geomgen.compat.scenesmith`
run end to end against real processes on the CPU backends.
"""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from geomgen.client import GeometryClient
from geomgen.compat import scenesmith_client
from geomgen.compat.scenesmith import (
    GeometryGenerationClient,
    GeometryGenerationError,
    GeometryGenerationServer,
    GeometryGenerationServerRequest,
    GeometryGenerationServerResponse,
)
from tests.conftest import REPO, free_base_port, wait_for

SAMPLES = REPO / "src" / "geomgen" / "samples"
OLD_KEYS = {"image_path", "output_dir", "prompt", "debug_folder", "output_filename", "backend", "sam3d_config",
            "scene_id"}

# --- GeometryClient: the old (host, port) call ------------------------------------------

def test_geometry_client_refuses_a_port_as_its_timeout():
    """GeometryClient('127.0.0.1', 7000) used to mean a 7000 s timeout on port 5555."""
    with pytest.raises(TypeError, match=r"did you mean GeometryClient\('127.0.0.1:7000'\)\?"):
        GeometryClient("127.0.0.1", 7000)
    with pytest.raises(TypeError, match="keyword-only"):
        GeometryClient("tcp://127.0.0.1:5555", 30.0)


# --- the client against a stub gateway ------------------------------------------------

class StubGateway:
    """An HTTP server that answers each POST with the next scripted reply and
    records every body; ``replies`` items are callables (handler, items) -> None."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.bodies: list[list[dict]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                stub.replies.pop(0)(self, body)

            def do_GET(self):
                payload = json.dumps({"status": "healthy"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _stream(handler, lines, finish=True):
    """Chunked NDJSON; ``finish`` False drops the connection mid-stream."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/x-ndjson")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for line in lines:
        data = (line + "\n").encode()
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        handler.wfile.flush()
    if finish:
        handler.wfile.write(b"0\r\n\r\n")
    else:
        handler.wfile.write(b"40\r\n{\"index\"")  # a chunk cut short
        handler.wfile.flush()
        handler.close_connection = True


def _ok(i, path):
    return json.dumps({"index": i, "status": "success", "data": {"geometry_path": path}, "error": None})


def _failed(i, message):
    return json.dumps({"index": i, "status": "error", "data": None, "error": message})


@pytest.fixture
def quick_backoff(monkeypatch):
    monkeypatch.setattr(scenesmith_client, "FIRST_BACKOFF_S", 0.01)


def _requests(n):
    return [GeometryGenerationServerRequest(image_path=f"/in/{i}.png", output_dir="/out", prompt=f"thing {i}")
            for i in range(n)]


def test_client_streams_results_skipping_blank_lines():
    """All eight keys go out, nulls included; blank keep-alive lines are skipped;
    success and error lines become the old classes, in completion order."""
    with StubGateway([lambda h, items: _stream(h, ["", _ok(1, "/out/b.glb"), "", _failed(0, "bad image")])]) as stub:
        client = GeometryGenerationClient("127.0.0.1", stub.port)
        results = list(client.generate_geometries(_requests(2)))
        assert client.health_check() is True
    assert [set(item) for item in stub.bodies[0]] == [OLD_KEYS, OLD_KEYS]
    assert stub.bodies[0][1]["prompt"] == "thing 1" and stub.bodies[0][1]["backend"] is None
    assert results[0] == (1, GeometryGenerationServerResponse(index=1, geometry_path="/out/b.glb"))
    index, error = results[1]
    assert index == 0 and isinstance(error, GeometryGenerationError)
    assert error.index == 0 and error.error_message == "bad image"


def test_client_retries_only_unanswered_items_after_a_dropped_connection(quick_backoff):
    """The stream breaks after item 1: the retry carries items 0 and 2 only,
    and their answers come back under their batch indices."""
    replies = [
        lambda h, items: _stream(h, [_ok(1, "/out/1.glb")], finish=False),
        lambda h, items: _stream(h, [_ok(1, "/out/2.glb"), _ok(0, "/out/0.glb")]),
    ]
    with StubGateway(replies) as stub:
        results = dict(GeometryGenerationClient("127.0.0.1", stub.port).generate_geometries(_requests(3)))
    assert [[item["prompt"] for item in body] for body in stub.bodies] == [
        ["thing 0", "thing 1", "thing 2"], ["thing 0", "thing 2"]]
    assert {i: r.geometry_path for i, r in results.items()} == {0: "/out/0.glb", 1: "/out/1.glb", 2: "/out/2.glb"}


def test_client_raises_a_refused_batch_at_once(quick_backoff):
    """A 400 is the caller's mistake: raised with the gateway's message, not retried."""
    def refuse(handler, items):
        payload = json.dumps({"error": "item 0: missing key prompt"}).encode()
        handler.send_response(400)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    with StubGateway([refuse, refuse]) as stub:
        with pytest.raises(requests.HTTPError, match="missing key prompt"):
            list(GeometryGenerationClient("127.0.0.1", stub.port).generate_geometries(_requests(1)))
    assert len(stub.bodies) == 1


def test_client_gives_up_after_max_retries(quick_backoff):
    port = free_base_port(1)  # nothing listens there
    client = GeometryGenerationClient("127.0.0.1", port)
    with pytest.raises(requests.ConnectionError):
        list(client.generate_geometries(_requests(1), max_retries=2))
    assert client.health_check() is False


def test_server_refuses_a_public_host_without_a_token():
    """Safe by default: binding beyond loopback needs a token file or insecure=True."""
    with pytest.raises(ValueError, match="token_file"):
        GeometryGenerationServer(host="0.0.0.0", backend="silhouette")
    GeometryGenerationServer(host="0.0.0.0", backend="silhouette", insecure=True)  # accepted, not started
    GeometryGenerationServer(host="0.0.0.0", backend="silhouette", token_file="token.txt")


def test_server_maps_the_old_options_to_backend_options():
    server = GeometryGenerationServer(use_mini=True, sam3d_config={"mode": "text", "threshold": 0.3, "seed": None})
    assert server.backend_options() == {"hunyuan3d.variant": "mini", "sam3d.mode": "text", "sam3d.threshold": "0.3"}


# --- end to end -----------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_old_classes_end_to_end(tmp_path):
    """The old server and client on silhouette and mesh: a GLB per good item, the
    bad item's error, health True while up and False after stop()."""
    port = free_base_port(1)
    server = GeometryGenerationServer(port=port, backend=["silhouette", "mesh"], log_file=tmp_path / "server.log")
    assert not server.is_running()
    server.start()
    try:
        server.wait_until_ready(timeout_s=120)
        assert server.is_running() and (server.host, server.port) == ("127.0.0.1", port)
        client = GeometryGenerationClient(host="127.0.0.1", port=port)
        assert client.health_check()
        out = tmp_path / "out"
        batch = [
            GeometryGenerationServerRequest(image_path=str(SAMPLES / "chair.png"), output_dir=str(out),
                                            prompt="a wooden chair", output_filename="chair", scene_id="kitchen"),
            GeometryGenerationServerRequest(image_path=str(SAMPLES / "table.glb"), output_dir=str(out),
                                            prompt="a table", backend="mesh"),
            GeometryGenerationServerRequest(image_path=str(tmp_path / "missing.png"), output_dir=str(out),
                                            prompt="nothing"),
        ]
        results = dict(client.generate_geometries(batch, timeout_s=120))
        assert sorted(results) == [0, 1, 2]
        for index in (0, 1):
            response = results[index]
            assert isinstance(response, GeometryGenerationServerResponse), response
            path = Path(response.geometry_path)
            assert response.index == index and path.is_absolute() and path.suffix == ".glb" and path.is_file()
            assert path.parent == out.resolve()
        assert Path(results[0].geometry_path).name == "chair.glb"
        error = results[2]
        assert isinstance(error, GeometryGenerationError) and error.index == 2 and error.error_message
    finally:
        server.stop()
    assert not server.is_running()
    assert not client.health_check()
    assert "any path" in (tmp_path / "server.log").read_text()


@pytest.mark.timeout(240)
def test_old_command_line_end_to_end(tmp_path):
    """`python -m geomgen.compat.scenesmith --backend silhouette --port P`,
    driven by the old client, stopped with SIGTERM."""
    port = free_base_port(1)
    log_path = tmp_path / "compat.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "geomgen.compat.scenesmith", "--backend", "silhouette",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        client = GeometryGenerationClient("127.0.0.1", port)

        def ready():
            assert proc.poll() is None, log_path.read_text()
            return client.health_check()

        wait_for(ready, timeout_s=120, interval_s=0.2, what="the compatibility server's /health")
        batch = [GeometryGenerationServerRequest(image_path=str(SAMPLES / "mug.png"), output_dir=str(tmp_path),
                                                 prompt="a blue mug")]
        [(index, response)] = list(client.generate_geometries(batch, timeout_s=120))
        assert index == 0 and isinstance(response, GeometryGenerationServerResponse), response
        assert Path(response.geometry_path).is_absolute() and Path(response.geometry_path).is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
        assert not client.health_check()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(240)
def test_old_command_line_stops_on_post_shutdown(tmp_path):
    """POST /shutdown stops the whole stack; the command exits 0."""
    port = free_base_port(1)
    log_path = tmp_path / "compat.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "geomgen.compat.scenesmith", "--backend", "mesh",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for(lambda: proc.poll() is not None or "serving on" in log_path.read_text(),
                 timeout_s=120, interval_s=0.2, what="the compatibility server's banner")
        assert proc.poll() is None, log_path.read_text()
        assert requests.post(f"http://127.0.0.1:{port}/shutdown", timeout=10).status_code == 200
        assert proc.wait(timeout=60) == 0, log_path.read_text()
        assert "POST /shutdown" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(240)
def test_token_file_and_allow_roots(tmp_path):
    """With token_file=, a client without the token (or with a wrong one) is refused
    (401, not retried); with token= it is served; /health needs none. allow_roots=
    narrows the paths items may use: an input outside them is that item's error."""
    token = "s3cret-token-0123456789abcdef"
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "table.glb").write_bytes((SAMPLES / "table.glb").read_bytes())
    port = free_base_port(1)
    batch = [GeometryGenerationServerRequest(image_path=str(tmp_path / "table.glb"), output_dir=str(tmp_path / "out"),
                                             prompt="a table", output_filename="table")]
    outside = [GeometryGenerationServerRequest(image_path=str(SAMPLES / "table.glb"),
                                               output_dir=str(tmp_path / "out"), prompt="a table")]
    with GeometryGenerationServer(port=port, backend="mesh", token_file=tmp_path / "token", allow_roots=[tmp_path]):
        assert GeometryGenerationClient("127.0.0.1", port).health_check()
        for stranger in (GeometryGenerationClient("127.0.0.1", port),
                         GeometryGenerationClient("127.0.0.1", port, token="wrong-token-0123456789")):
            with pytest.raises(requests.HTTPError, match="401"):
                list(stranger.generate_geometries(batch, timeout_s=60))
        [(_, response)] = GeometryGenerationClient("127.0.0.1", port, token=token).generate_geometries(batch)
        assert isinstance(response, GeometryGenerationServerResponse), response
        assert Path(response.geometry_path) == (tmp_path / "out" / "table.glb").resolve()
        [(_, error)] = GeometryGenerationClient("127.0.0.1", port, token=token).generate_geometries(outside)
        assert isinstance(error, GeometryGenerationError) and str(SAMPLES) in error.error_message, error
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["table.glb"]  # the refused batches wrote nothing
