"""Admission control: how much the broker holds, in jobs and bytes, overall and
per client, and whether one more request fits.

Pure bookkeeping with no sockets; dispatch.py charges a job when it accepts it,
resizes the charge when the input is freed and the GLB is held instead, and
releases it when the job ends. A request that does not fit is refused with
``busy`` and a retry-after hint, so memory stays bounded whatever clients send.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Limits of what the broker holds: jobs accepted and not yet finished, and
    the bytes they carry (inputs, then GLBs), overall and per client identity."""

    max_jobs: int
    max_bytes: int
    max_client_jobs: int
    max_client_bytes: int

    def __post_init__(self) -> None:
        for name in ("max_jobs", "max_bytes", "max_client_jobs", "max_client_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"admission limit {name} must be >= 1, got {getattr(self, name)}")


@dataclass
class _Usage:
    jobs: int = 0
    bytes: int = 0


class Admission:
    """Jobs and bytes held, overall and per client, against ``limits``."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = _Usage()
        self._clients: dict[bytes, _Usage] = {}
        self._charges: dict[str, tuple[bytes, int]] = {}  # job id -> (client, bytes charged)
        self.refused = 0

    def refusal(self, client: bytes, size_bytes: int) -> str | None:
        """Why a new job of ``size_bytes`` from ``client`` does not fit now (a
        sentence), or None if it does."""
        lim, total = self.limits, self.total
        mine = self._clients.get(client) or _Usage()
        if total.jobs + 1 > lim.max_jobs:
            return f"the broker holds {total.jobs} jobs, its limit"
        if mine.jobs + 1 > lim.max_client_jobs:
            return f"this client has {mine.jobs} jobs at the broker, the per-client limit"
        if size_bytes > lim.max_client_bytes or size_bytes > lim.max_bytes:
            return None  # never fits: admitted alone, when the client holds nothing else
        if total.bytes and total.bytes + size_bytes > lim.max_bytes:
            return f"the broker holds {_mib(total.bytes)} of inputs and GLBs, near its {_mib(lim.max_bytes)} limit"
        if mine.bytes and mine.bytes + size_bytes > lim.max_client_bytes:
            return (f"this client has {_mib(mine.bytes)} of inputs and GLBs at the broker, near the per-client "
                    f"{_mib(lim.max_client_bytes)} limit")
        return None

    def charge(self, job_id: str, client: bytes, size_bytes: int) -> None:
        self._charges[job_id] = (client, size_bytes)
        usage = self._clients.setdefault(client, _Usage())
        usage.jobs += 1
        usage.bytes += size_bytes
        self.total.jobs += 1
        self.total.bytes += size_bytes

    def resize(self, job_id: str, size_bytes: int) -> None:
        """The job now holds ``size_bytes`` (its input freed, its GLB kept)."""
        entry = self._charges.get(job_id)
        if entry is None:
            return
        client, before = entry
        self._charges[job_id] = (client, size_bytes)
        self._clients[client].bytes += size_bytes - before
        self.total.bytes += size_bytes - before

    def release(self, job_id: str) -> None:
        entry = self._charges.pop(job_id, None)
        if entry is None:
            return
        client, size_bytes = entry
        usage = self._clients[client]
        usage.jobs -= 1
        usage.bytes -= size_bytes
        if usage.jobs == 0:
            del self._clients[client]
        self.total.jobs -= 1
        self.total.bytes -= size_bytes

    def clients(self) -> list[bytes]:
        """Client identities holding jobs."""
        return list(self._clients)

    def client_jobs(self, client: bytes) -> int:
        usage = self._clients.get(client)
        return usage.jobs if usage else 0

    def summary(self) -> dict:
        """For health: what is held against which limit."""
        lim = self.limits
        return {"held_jobs": self.total.jobs, "held_bytes": self.total.bytes, "max_jobs": lim.max_jobs,
                "max_bytes": lim.max_bytes, "max_client_jobs": lim.max_client_jobs,
                "max_client_bytes": lim.max_client_bytes, "clients": len(self._clients), "refused": self.refused}


def _mib(size_bytes: int) -> str:
    return f"{size_bytes / 2**20:.0f} MiB"
