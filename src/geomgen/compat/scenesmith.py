"""SceneSmith's geometry generation server, served by geomgen: the old classes
and the old command line (``python -m geomgen.compat.scenesmith``), same names
and arguments. The server starts a local broker, one worker for the backend
asked, an SDF worker and the HTTP gateway on ``host:port``; docs/scenesmith.md.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import click

from geomgen.compat.scenesmith_client import (
    GeometryGenerationClient,
    GeometryGenerationError,
    GeometryGenerationServerRequest,
    GeometryGenerationServerResponse,
)
from geomgen.errors import TransportError
from geomgen.endpoints import is_loopback
from geomgen.lifecycle import stop_on_signals
from geomgen.server import GeometryServer

__all__ = [
    "GeometryGenerationServer",
    "GeometryGenerationClient",
    "GeometryGenerationServerRequest",
    "GeometryGenerationServerResponse",
    "GeometryGenerationError",
    "main",
]

log = logging.getLogger("geomgen.compat.scenesmith")

DEFAULT_PORT = 7000  # the old server's
DEFAULT_BACKEND = "hunyuan3d"  # the old server's
SDF_WORKERS = 1  # SDF output is an extension items ask for; one conversion process serves it
WATCH_INTERVAL_S = 0.5  # how often the command line checks that the stack still runs
READY_STEP_S = 2.0  # the command line waits for readiness in steps this long, to notice signals


class GeometryGenerationServer:
    """The old server's class: a geomgen stack with the HTTP gateway on ``host:port``.

    Args (the old ones):
        host, port: where the HTTP API listens.
        preload_pipeline: accepted; geomgen workers always load their pipeline
            when they start, so wait_until_ready() returns once it is loaded.
        use_mini: Hunyuan3D-2 mini (the ``hunyuan3d`` option ``variant=mini``).
        backend: the backend of items that name none: ``hunyuan3d``, ``sam3d``,
            ``silhouette``, ``mesh`` or a plug-in; a list starts several, the
            first being the default.
        sam3d_config: the ``sam3d`` backend's options (``sam3_checkpoint``,
            ``sam3d_checkpoint``, ``mode``, ``threshold``, ...).
        log_file: this server's log; the processes' own logs go to ``<log_file>.d/``.
    Args (new, keyword-only):
        allow_roots: folders items may read from and write to; None: any path
            this process may access, as the old server did (loopback only).
        token_file: a file holding the bearer token every route but /health needs.
        insecure: bind a non-loopback host without a token (logged loudly).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        preload_pipeline: bool = True,
        use_mini: bool = False,
        backend: str | Sequence[str] = DEFAULT_BACKEND,
        sam3d_config: Mapping[str, Any] | None = None,
        log_file: str | os.PathLike | None = None,
        *,
        allow_roots: Sequence[str | os.PathLike] | None = None,
        token_file: str | os.PathLike | None = None,
        insecure: bool = False,
    ) -> None:
        if not is_loopback(host) and token_file is None and not insecure:
            raise ValueError(
                f"binding {host} lets anyone who can reach it read and write files as this process: "
                "give token_file= (--token-file) to require a bearer token, or insecure=True (--insecure)"
            )
        self.host = host
        self.port = int(port)
        self.preload_pipeline = preload_pipeline
        self.use_mini = use_mini
        self.backends = [backend] if isinstance(backend, str) else list(backend)
        if not self.backends:
            raise ValueError("backend must name at least one backend")
        self.backend = self.backends[0]
        self.sam3d_config = dict(sam3d_config or {})
        self.log_file = Path(log_file) if log_file is not None else None
        self.allow_roots = None if allow_roots is None else [str(Path(r).resolve()) for r in allow_roots]
        self.token_file = None if token_file is None else str(token_file)
        self.insecure = bool(insecure)
        self._server: GeometryServer | None = None
        self._log_handler: logging.Handler | None = None

    def backend_options(self) -> dict[str, str]:
        """The workers' ``--backend-option`` values, scoped to their backend."""
        options = {f"sam3d.{key}": _option_text(value) for key, value in self.sam3d_config.items() if value is not None}
        if self.use_mini:
            options["hunyuan3d.variant"] = "mini"
        return options

    def start(self) -> None:
        """Start the processes and return at once (see wait_until_ready)."""
        if self._server is not None:
            raise RuntimeError("the GeometryGenerationServer is already started")
        self._open_log()
        log.info("starting geomgen (backend %s) with the HTTP API on %s:%d", ", ".join(self.backends),
                 self.host, self.port)
        if self.allow_roots is None:
            log.info("items may read and write any path this process can access, as the old server's did; "
                     "allow_roots=[...] (--allow-root DIR) narrows that")
        if not is_loopback(self.host) and self.token_file is None:
            log.warning("INSECURE: %s is not loopback and no token is required: anyone who can reach port %d "
                        "can read and write files as this process", self.host, self.port)
        if not self.preload_pipeline:
            log.info("preload_pipeline=False: geomgen workers load their pipeline when they start regardless")
        http_host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        self._server = GeometryServer(
            backends=self.backends, sdf_workers=SDF_WORKERS, host="127.0.0.1", base_port=0,
            backend_options=self.backend_options(), http=f"{http_host}:{self.port}",
            http_options={"allow_roots": self.allow_roots, "default_backend": self.backend,
                          "token_file": self.token_file, "insecure": self.insecure},
            log_dir=None if self.log_file is None else Path(f"{self.log_file}.d"),
        )
        try:
            self._server.start()
        except BaseException:
            self.stop()
            raise

    def wait_until_ready(self, timeout_s: float = 30) -> None:
        """Wait until every worker is loaded and the HTTP API answers /health.

        Raises TimeoutError after ``timeout_s`` (saying what is missing), or
        RuntimeError when a process exited (with the end of its log).
        """
        if self._server is None:
            self.start()
        assert self._server is not None
        try:
            self._server.wait_until_ready(timeout_s)
        except TransportError as exc:
            if exc.code == "not_ready":
                raise TimeoutError(str(exc)) from exc
            raise RuntimeError(str(exc)) from exc
        log.info("ready: http://%s:%d", self.host, self.port)

    def is_running(self) -> bool:
        """Whether the server was started, is not stopped, and no process of it exited."""
        server = self._server
        return server is not None and bool(server.children) and not server.exited()

    def shut_down_over_http(self) -> bool:
        """Whether the gateway exited cleanly, as it does after POST /shutdown."""
        server = self._server
        return server is not None and any(
            child.name == "gateway" and child.process is not None and child.process.returncode == 0
            for child in server.exited())

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL); safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            log.info("stopped")
        if self._log_handler is not None:
            logging.getLogger("geomgen").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def _open_log(self) -> None:
        if self.log_file is None or self._log_handler is not None:
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        geomgen_log = logging.getLogger("geomgen")
        geomgen_log.addHandler(handler)
        if geomgen_log.getEffectiveLevel() > logging.INFO:
            geomgen_log.setLevel(logging.INFO)
        self._log_handler = handler

    def __enter__(self) -> "GeometryGenerationServer":
        self.start()
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _option_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# --- the old command line ------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Where the HTTP API listens.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--preload/--no-preload", default=True, show_default=True,
              help="Accepted for compatibility: workers always load their pipeline at start.")
@click.option("--use-mini", is_flag=True, help="Hunyuan3D-2 mini.")
@click.option("--backend", "backends", multiple=True, show_default=True,
              help=f"Backend of items that name none (default {DEFAULT_BACKEND}); repeat to start several, "
                   "the first being the default.")
@click.option("--sam3-checkpoint", default=None, help="SAM 3 checkpoint file (sam3d backend).")
@click.option("--sam3d-checkpoint", default=None, help="SAM 3D Objects pipeline.yaml (sam3d backend).")
@click.option("--sam3d-mode", type=click.Choice(["foreground", "text"]), default=None,
              help="sam3d: foreground object, or the object the prompt names.")
@click.option("--sam3d-threshold", type=click.FloatRange(0.0, 1.0), default=None, help="SAM 3 confidence threshold.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--allow-root", "allow_roots", multiple=True, type=click.Path(file_okay=False),
              help="Folder items may read and write (repeatable); default: any path, as the old server.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the bearer token every route but /health requires.")
@click.option("--insecure", is_flag=True, help="Bind a non-loopback host without a token.")
@click.option("--ready-timeout", default=600.0, show_default=True, help="Seconds to wait for the workers to load.")
def main(host, port, preload, use_mini, backends, sam3_checkpoint, sam3d_checkpoint, sam3d_mode, sam3d_threshold,
         verbose, allow_roots, token_file, insecure, ready_timeout) -> None:
    """SceneSmith's standalone geometry generation server, served by geomgen."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sam3d_config = {"sam3_checkpoint": sam3_checkpoint, "sam3d_checkpoint": sam3d_checkpoint,
                    "mode": sam3d_mode, "threshold": sam3d_threshold}
    try:
        server = GeometryGenerationServer(
            host=host, port=port, preload_pipeline=preload, use_mini=use_mini,
            backend=list(backends) or DEFAULT_BACKEND,
            sam3d_config={k: v for k, v in sam3d_config.items() if v is not None} or None,
            allow_roots=list(allow_roots) or None, token_file=token_file, insecure=insecure,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    with stop_on_signals(log) as stop:
        try:
            server.start()
            if not _wait_ready(server, ready_timeout, stop):
                return
            click.echo(f"serving on http://{host}:{port} (Ctrl-C to stop)", err=True)
            while not stop.wait(WATCH_INTERVAL_S):
                if server.shut_down_over_http():
                    click.echo("stopping: POST /shutdown", err=True)
                    return
                if not server.is_running():
                    click.echo("a geomgen process exited; stopping", err=True)
                    sys.exit(1)
        except (TimeoutError, RuntimeError) as exc:
            if server.shut_down_over_http():  # POST /shutdown while the workers were loading
                click.echo("stopping: POST /shutdown", err=True)
                return
            click.echo(f"geomgen.compat.scenesmith: {exc}", err=True)
            sys.exit(1)
        finally:
            server.stop()


def _wait_ready(server: GeometryGenerationServer, timeout_s: float, stop) -> bool:
    """wait_until_ready in short steps so SIGINT/SIGTERM while pipelines load
    stops at once; False when stopped, TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        step_s = min(READY_STEP_S, deadline - time.monotonic())
        try:
            server.wait_until_ready(max(0.1, step_s))
            return True
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise
    return False


if __name__ == "__main__":
    main()
