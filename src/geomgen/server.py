"""The launcher: a broker, its GPU workers and an SDF worker as child processes.

GeometryServer starts ``python -m geomgen broker|gpu-worker|sdf-worker`` with
one GPU worker per visible GPU per GPU backend (one per CPU backend), waits
until the broker sees them all, and stops them with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from geomgen import defaults
from geomgen.endpoints import Endpoints
from geomgen.errors import InputError, TransportError
from geomgen.keys import (
    BROKER_KEY_ENV,
    BROKER_PUBLIC,
    BROKER_SECRET,
    KEY_ENV,
    KEYS_ENV,
    SECRET_SUFFIX,
    PeerKeys,
    add_peer,
    init_keys,
    load_peer_keys,
    role_folder,
)
from geomgen.lifecycle import stop_on_signals
from geomgen.processes import die_with_parent

log = logging.getLogger("geomgen.server")

# GeometryServer keyword -> broker command-line flag (values in seconds)
BROKER_SETTINGS = {
    "heartbeat_interval_s": "--heartbeat-interval",
    "no_worker_timeout_s": "--no-worker-timeout",
    "sdf_lease_s": "--sdf-lease",
    "cache_dir": "--cache-dir",  # the result cache's folder
    "cache_size": "--cache-size",  # its size, bytes (or 10G...)
    "no_cache": "--no-cache",  # True: no result cache
}
LOG_TAIL_BYTES = 4000  # how much of a failed child's log goes into the error


@dataclass
class Child:
    """One child process of the launcher and where its output goes."""

    name: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen | None = None

    def tail(self, max_bytes: int = LOG_TAIL_BYTES) -> str:
        """The last ``max_bytes`` of the child's log, as text."""
        try:
            data = self.log_path.read_bytes()[-max_bytes:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()


def visible_gpus() -> list[str]:
    """GPU ids this machine exposes, without importing torch.

    CUDA_VISIBLE_DEVICES when set (an empty value or -1 means none), else the
    indices listed by ``nvidia-smi -L``, else none.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [part.strip() for part in env.split(",") if part.strip()]
        return [] if not ids or ids[0].startswith("-") else ids
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split(":")[0].split()[1] for line in listing.splitlines() if line.startswith("GPU ")]


def backend_uses_gpu(name: str) -> bool:
    """Whether backend ``name`` runs one worker per GPU (its class says; a name
    in GPU_BACKENDS counts as such even when its module cannot load here)."""
    from geomgen.backends import GPU_BACKENDS, load_backend_class
    from geomgen.errors import GeomgenError

    try:
        return bool(load_backend_class(name).uses_gpu)
    except GeomgenError:
        return name in GPU_BACKENDS


def free_base_port(host: str = defaults.HOST, count: int = 4) -> int:
    """A base port with ``count`` consecutive ports free on ``host``, below the
    system's ephemeral range: a port from that range can be taken as the local
    end of any outgoing connection (a worker's, a client's) between this check
    and the broker's bind."""
    top = min(_ephemeral_low(), 49152) - count
    bottom = 20000 if top > 21000 else 1024
    pick = random.Random()
    for _ in range(200):
        base = pick.randrange(bottom, top)
        if all(_port_free(host, port) for port in range(base, base + count)):
            return base
    raise TransportError(f"found no {count} consecutive free ports on {host}", code="no_ports")


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
            return True
        except OSError:
            return False


KEY_ENV_VARS = (KEY_ENV, BROKER_KEY_ENV, KEYS_ENV)
HTTP_OPTIONS = ("allow_roots", "default_backend", "token_file", "insecure", "keepalive_s")


class GeometryServer:
    """A broker with its workers, as child processes of this one.

    Args:
        backends: backend names; GPU backends get one worker per GPU in ``gpus``.
        sdf_workers: conversion processes of the SDF worker (0: GLB only).
        host: where the broker binds; ``0.0.0.0`` for other machines.
        base_port: the broker's client port (the others follow); 0 or None picks free ports.
        backend_options: ``--backend-option`` key -> value for every GPU worker.
        gpus: GPU ids; default from CUDA_VISIBLE_DEVICES or ``nvidia-smi -L``.
        log_dir: where each child's log goes; default a new temporary folder,
            removed by stop() when every child exited cleanly.
        env: extra environment variables for the children.
        keys_dir: a key folder (`geomgen keys init`; made here if it has no broker
            key): the broker uses CURVE and each process started here gets a key
            of its role, added to the folder's allow-lists (``client_keys`` is the
            one this server's own client uses). None: no keys (loopback only).
        http: ``HOST:PORT`` where a ``geomgen gateway`` child serves the HTTP API
            (port 0: a free one); None: no HTTP.
        http_options: for the gateway: ``allow_roots`` (a list of folders; None: any
            path; absent: this process's working directory), ``default_backend``,
            ``token_file``, ``insecure``, ``keepalive_s``.
        broker_settings: heartbeat_interval_s, no_worker_timeout_s, sdf_lease_s (seconds);
            cache_dir, cache_size (bytes or "10G"), no_cache (True: no result cache).
    """

    def __init__(
        self,
        backends: Sequence[str] = ("silhouette", "mesh"),
        sdf_workers: int = 2,
        host: str = defaults.HOST,
        base_port: int | None = defaults.CLIENT_PORT,
        backend_options: dict[str, Any] | None = None,
        gpus: Sequence[str | int] | None = None,
        log_dir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        keys_dir: str | os.PathLike | None = None,
        http: str | None = None,
        http_options: dict[str, Any] | None = None,
        **broker_settings: float,
    ) -> None:
        unknown = sorted(set(broker_settings) - set(BROKER_SETTINGS))
        if unknown:
            raise TypeError(f"unknown broker setting(s): {', '.join(unknown)}; known: {', '.join(BROKER_SETTINGS)}")
        if isinstance(backends, str):
            backends = [backends]
        if not backends:
            raise InputError("GeometryServer needs at least one backend", code="bad_option")
        if sdf_workers < 0:
            raise InputError("sdf_workers must be >= 0", code="bad_option")
        self.backends = list(dict.fromkeys(backends))
        self.sdf_workers = int(sdf_workers)
        self.host = host
        self.base_port = base_port
        self.backend_options = {str(k): str(v) for k, v in (backend_options or {}).items()}
        self.gpus = None if gpus is None else [str(g) for g in gpus]
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._temporary_log_dir = False
        self.env = dict(env or {})
        self.broker_settings = broker_settings
        self.endpoints: Endpoints | None = None
        self.children: list[Child] = []
        self.keys_dir = Path(keys_dir) if keys_dir is not None else None
        self.client_keys: PeerKeys | None = None
        self.http = http
        self.http_options = dict(http_options or {})
        unknown = sorted(set(self.http_options) - set(HTTP_OPTIONS))
        if unknown:
            raise TypeError(f"unknown http_options: {', '.join(unknown)}; known: {', '.join(HTTP_OPTIONS)}")
        self._http_host_port: tuple[str, int] | None = None
        if http is not None:
            host_part, sep, port_part = http.rpartition(":")
            if not sep or not host_part or not port_part.isdigit():
                raise InputError(f"http must be HOST:PORT, got {http!r}", code="bad_option")
            self._http_host_port = (host_part, int(port_part))

    @property
    def http_address(self) -> str:
        """The gateway's URL, ``http://HOST:PORT`` (available after start(); http given)."""
        if self._http_host_port is None or not self.children:
            raise TransportError("the GeometryServer has no HTTP gateway started", code="not_started")
        host, port = self._http_host_port
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '*') else host}:{port}"

    @property
    def address(self) -> str:
        """The broker's client endpoint, for GeometryClient (available after start())."""
        if self.endpoints is None:
            raise TransportError("the GeometryServer is not started", code="not_started")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "*") else self.host
        return Endpoints.from_base(host, self.endpoints.client_port).client

    def expected_workers(self) -> dict[str, int]:
        """How many GPU-worker processes each backend gets."""
        gpus = visible_gpus() if self.gpus is None else self.gpus
        return {name: max(1, len(gpus)) if backend_uses_gpu(name) else 1 for name in self.backends}

    def start(self) -> "GeometryServer":
        """Start the broker and the workers; returns at once (see wait_until_ready)."""
        if self.children:
            raise TransportError("the GeometryServer is already started", code="already_started")
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="geomgen-logs-"))
            self._temporary_log_dir = True
        self.log_dir.mkdir(parents=True, exist_ok=True)
        base = self.base_port or free_base_port("127.0.0.1" if self.host in ("0.0.0.0", "*") else self.host)
        self.endpoints = Endpoints.from_base(self.host, base)
        broker_args = ["broker", "--host", self.host, "--port", str(base)]
        for key, value in self.broker_settings.items():
            if key == "no_cache":  # a flag
                broker_args += [BROKER_SETTINGS[key]] if value else []
                continue
            broker_args += [BROKER_SETTINGS[key], str(value)]
        if self.keys_dir is not None:
            broker_args += ["--keys", str(self.keys_dir)]
            self.client_keys = self._peer_keys("client", "serve-client")
        self._spawn("broker", broker_args)
        broker = self.address.removeprefix("tcp://")
        gpus = visible_gpus() if self.gpus is None else self.gpus
        for name in self.backends:
            options = [arg for key, value in self.backend_options.items() for arg in ("--backend-option", f"{key}={value}")]
            per_gpu = gpus if backend_uses_gpu(name) and gpus else [None]
            for gpu in per_gpu:
                args = ["gpu-worker", "--backend", name, "--broker", broker, *options]
                child = f"gpu-worker-{name}" + (f"-gpu{gpu}" if gpu is not None else "")
                gpu_args = ["--gpu", gpu] if gpu is not None else []
                self._spawn(child, args + gpu_args + self._key_args("gpu-worker", child))
        if self.sdf_workers:
            self._spawn("sdf-worker", ["sdf-worker", "--broker", broker, "--procs", str(self.sdf_workers),
                                       *self._key_args("sdf-worker", "sdf-worker")])
        if self._http_host_port is not None:
            self._spawn("gateway", self._gateway_args(broker))
        return self

    def _gateway_args(self, broker: str) -> list[str]:
        host, port = self._http_host_port  # type: ignore[misc]
        if port == 0:
            port = free_base_port("127.0.0.1" if host in ("0.0.0.0", "*") else host, 1)
            self._http_host_port = (host, port)
        options = self.http_options
        args = ["gateway", "--broker", broker, "--host", host, "--port", str(port)]
        if "allow_roots" not in options:
            args += ["--allow-root", str(Path.cwd())]
        elif options["allow_roots"] is None:
            args += ["--allow-any-path"]
        else:
            for root in options["allow_roots"]:
                args += ["--allow-root", str(root)]
        if options.get("default_backend"):
            args += ["--default-backend", str(options["default_backend"])]
        if options.get("token_file"):
            args += ["--token-file", str(options["token_file"])]
        if options.get("insecure"):
            args += ["--insecure"]
        if options.get("keepalive_s"):
            args += ["--keepalive", str(options["keepalive_s"])]
        return args + self._key_args("client", "gateway")

    def _peer_keys(self, role: str, name: str) -> PeerKeys:
        """The key pair of peer ``name`` in the key folder, made (and allowed) if missing."""
        assert self.keys_dir is not None
        if not (self.keys_dir / BROKER_SECRET).is_file():
            init_keys(self.keys_dir)
        secret = self.keys_dir / role_folder(role) / f"{name}{SECRET_SUFFIX}"
        if not secret.is_file():
            add_peer(self.keys_dir, role, name)
        return load_peer_keys(secret, self.keys_dir / BROKER_PUBLIC)

    def _key_args(self, role: str, name: str) -> list[str]:
        if self.keys_dir is None:
            return []
        self._peer_keys(role, name)
        secret = self.keys_dir / role_folder(role) / f"{name}{SECRET_SUFFIX}"
        return ["--key", str(secret), "--broker-key", str(self.keys_dir / BROKER_PUBLIC)]

    def _spawn(self, name: str, args: list[str]) -> Child:
        assert self.log_dir is not None
        child = Child(name, args, self.log_dir / f"{name}.log")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        for name in KEY_ENV_VARS:  # keys come from this server's flags, never from an inherited environment
            env.pop(name, None)
        # Nor from a config file: one written for this host's commands ([all] key = ...) would give
        # a worker keys this stack's broker does not use. The children's settings are this server's.
        env.pop("GEOMGEN_CONFIG", None)
        with open(child.log_path, "wb") as log:
            child.process = subprocess.Popen(
                [sys.executable, "-m", "geomgen", *args], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.children.append(child)
        return child

    def exited(self) -> list[Child]:
        """Children that are no longer running."""
        return [c for c in self.children if c.process is not None and c.process.poll() is not None]

    def _exited_error(self, child: Child, when: str = "before the server was ready") -> TransportError:
        code = child.process.returncode if child.process else None
        return TransportError(
            f"{child.name} exited (code {code}) {when}; "
            f"its log {child.log_path} ends with:\n{child.tail()}",
            code="worker_exited",
        )

    def wait_until_ready(self, timeout_s: float = 120.0) -> dict:
        """Wait until the broker sees every started GPU worker alive and the SDF
        slots; return its health stats. Raises TransportError naming a child that
        exited (with the tail of its log) or, after ``timeout_s``, what is missing."""
        from geomgen.client import GeometryClient

        if not self.children:
            self.start()
        expected = self.expected_workers()
        deadline = time.monotonic() + timeout_s
        stats: dict = {}
        with GeometryClient(self.address, timeout_s=max(1.0, timeout_s), keys=self.client_keys) as client:
            while True:
                for child in self.exited():
                    raise self._exited_error(child)
                try:
                    stats = client.health(timeout_s=min(1.0, max(0.1, deadline - time.monotonic())))
                except TransportError:
                    stats = {}
                missing = self._missing(stats, expected)
                if stats and not missing and self._http_host_port is not None and not self._http_ready():
                    missing = ["the HTTP gateway"]
                if stats and not missing:
                    return stats
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"the server was not ready after {timeout_s:.0f} s: waiting for {', '.join(missing)}; "
                        f"logs in {self.log_dir}", code="not_ready",
                    )
                time.sleep(0.1)  # paces the queries: a broker answers "not ready" at once

    def _http_ready(self) -> bool:
        """Whether the gateway answers GET /health with 200."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.http_address}/health", timeout=2.0) as reply:
                return reply.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _missing(self, stats: dict, expected: dict[str, int]) -> list[str]:
        if not stats:
            return ["the broker"]
        per_backend = stats.get("backends", {})
        missing = [
            f"{n - per_backend.get(name, {}).get('alive', 0)} {name} worker(s)"
            for name, n in expected.items() if per_backend.get(name, {}).get("alive", 0) < n
        ]
        if self.sdf_workers and stats.get("sdf_slots", 0) < self.sdf_workers:
            missing.append(f"{self.sdf_workers} SDF slot(s)")
        return missing

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child, SIGKILL those still running after ``grace_s``; reap all."""
        running = [c.process for c in self.children if c.process is not None and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        clean = all(c.process is None or c.process.returncode in (0, -signal.SIGTERM) for c in self.children)
        if clean and self._temporary_log_dir and self.log_dir is not None:
            # Logs of a run where nothing went wrong are not worth a folder per run in /tmp.
            shutil.rmtree(self.log_dir, ignore_errors=True)
        self.children = []

    def serve_forever(self, poll_interval_s: float = 0.5) -> int:
        """Block until SIGINT/SIGTERM or the broker exits, then stop; returns an exit code.

        A worker that exits is reported on stderr; the others keep serving.
        """
        reported: set[str] = set()
        try:
            with stop_on_signals(log) as stop:
                while not stop.wait(poll_interval_s):
                    for child in self.exited():
                        if child.name in reported:
                            continue
                        reported.add(child.name)
                        if child.name == "gateway" and child.process is not None and child.process.returncode == 0:
                            return 0  # POST /shutdown: the whole stack stops with its gateway
                        print(f"geomgen serve: {self._exited_error(child, 'while serving')}", file=sys.stderr)
                        if child.name == "broker":
                            return 1
                return 0
        finally:
            self.stop()

    def __enter__(self) -> "GeometryServer":
        self.start()
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    # A launcher killed with SIGKILL cannot stop its children; have the kernel do it.
    die_with_parent(signal.SIGTERM)
