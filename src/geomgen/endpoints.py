"""Broker addresses: one HOST[:PORT] names all four of the broker's sockets.

The broker binds four consecutive ports starting at its base (client) port
unless told otherwise, so a worker on another machine needs only the broker's
address.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from geomgen import defaults
from geomgen.errors import InputError


@dataclass(frozen=True)
class Endpoints:
    """The broker's four sockets on one host."""

    host: str = defaults.HOST
    client_port: int = defaults.CLIENT_PORT
    worker_port: int = defaults.WORKER_PORT
    sdf_job_port: int = defaults.SDF_JOB_PORT
    sdf_result_port: int = defaults.SDF_RESULT_PORT

    @classmethod
    def from_base(cls, host: str, base_port: int) -> "Endpoints":
        return cls(host, base_port, base_port + 1, base_port + 2, base_port + 3)

    def _url(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port}"

    @property
    def client(self) -> str:
        return self._url(self.client_port)

    @property
    def worker(self) -> str:
        return self._url(self.worker_port)

    @property
    def sdf_job(self) -> str:
        return self._url(self.sdf_job_port)

    @property
    def sdf_result(self) -> str:
        return self._url(self.sdf_result_port)

    def bind_host(self) -> str:
        """Host for bind(): '*' for 0.0.0.0, else the host itself."""
        return "*" if self.host in ("0.0.0.0", "*") else self.host


_ADDRESS = re.compile(r"^(?:tcp://)?(?P<host>\[[^\]]+\]|[^:/\[\]]+)(?::(?P<port>\d+))?/?$")


def parse_broker(address: str, **overrides: int | None) -> Endpoints:
    """Parse HOST, HOST:PORT or tcp://HOST:PORT into the broker's endpoints.

    PORT is the broker's client port; the worker and SDF ports follow it
    (+1, +2, +3) as in the defaults, unless ``overrides`` name them
    (``worker_port=...`` etc.; ``None`` values are ignored).
    """
    match = _ADDRESS.match(address.strip())
    if not match:
        raise InputError(
            f"cannot read broker address {address!r}; use HOST, HOST:PORT or tcp://HOST:PORT",
            code="bad_address",
        )
    host = match.group("host").strip("[]")
    port = int(match.group("port") or defaults.CLIENT_PORT)
    if not 0 < port < 65533:
        raise InputError(f"broker port {port} is out of range", code="bad_address")
    endpoints = Endpoints.from_base(host, port)
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes:
        endpoints = Endpoints(**{**endpoints.__dict__, **changes})
    return endpoints


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the broker reachable from this machine only:
    localhost, 127.0.0.0/8 or ::1 (a name is resolved; '*' and 0.0.0.0 are not)."""
    name = host.strip("[]")
    if name in ("*", "", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
