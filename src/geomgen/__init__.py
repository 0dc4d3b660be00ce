"""geomgen: pictures of objects in, simulation-ready Drake SDFormat assets out."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "GeometryClient", "GeometryRequest", "GeometryResult", "GeometryServer"]


def __getattr__(name: str):
    # Lazy so that `import geomgen` (and every worker process) stays cheap.
    if name in ("GeometryClient", "GeometryRequest", "GeometryResult"):
        from geomgen import client

        return getattr(client, name)
    if name == "GeometryServer":
        from geomgen.server import GeometryServer

        return GeometryServer
    raise AttributeError(f"module 'geomgen' has no attribute {name!r}")
