"""Broker memory and responsiveness under request floods.

A real broker process (`python -m geomgen broker`, default admission limits)
with no workers, so every accepted request stays held; one flooding client (a
raw DEALER, as a hostile or careless client would be) sends requests as fast
as the socket takes them and reads the broker's answers (refusals) as they
come; a second client asks for health every 100 ms and times the answer. The
broker's RSS is read from /proc every 100 ms. Two floods, as in issue 9:
50,000 requests of 1 KiB, then 20,000 of 100 KiB; after each the flooding
client disconnects (its jobs are dropped at the liveness window) and the RSS
is followed for a minute.

    python benchmarks/bench_flood.py [--small 50000] [--large 20000] [--after-s 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine  # noqa: E402
from geomgen import protocol  # noqa: E402
from geomgen.endpoints import Endpoints  # noqa: E402
from geomgen.server import free_base_port  # noqa: E402

PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_MIB


class Sampler(threading.Thread):
    """RSS of the broker every 100 ms, and a timed health query every 100 ms."""

    def __init__(self, pid: int, address: str) -> None:
        super().__init__(daemon=True)
        self.pid, self.address = pid, address
        self.rss: list[tuple[float, float]] = []
        self.health_ms: list[float] = []
        self.health_missed = 0
        self.stats: dict = {}
        self.stop = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        query = protocol.encode(protocol.HealthQuery())
        while not self.stop.wait(0.1):
            self.rss.append((time.monotonic(), rss_mib(self.pid)))
            start = time.monotonic()
            sock.send_multipart(query)
            if sock.poll(5000):
                _, reply = protocol.decode(sock.recv_multipart(), protocol.BROKER_TO_CLIENT)
                self.health_ms.append((time.monotonic() - start) * 1e3)
                self.stats = reply.stats
            else:
                self.health_missed += 1
        sock.close(0)


def flood(address: str, count: int, size: int) -> dict:
    """Send ``count`` requests of ``size`` input bytes from one client; read
    every answer that comes back meanwhile. Returns counts and seconds."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.connect(address)
    payload = os.urandom(size)
    refused = answered = 0
    start = time.monotonic()

    def read() -> None:
        nonlocal refused, answered
        while sock.poll(0):
            command, message = protocol.decode(sock.recv_multipart(), protocol.BROKER_TO_CLIENT)
            if command is protocol.Command.FINAL:
                answered += 1
                refused += (message.error or {}).get("code") == "busy"

    for i in range(count):
        frames = protocol.encode(protocol.ClientRequest(
            request_id=f"f{i}", backend="mesh", input_name="in.glb", input_data=payload, output_name=f"o{i}",
            events=False))
        while True:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                read()
                sock.poll(10)
        if i % 256 == 0:
            read()
    send_s = time.monotonic() - start
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and answered < refused + 1 and sock.poll(500):
        read()
    read()
    sock.close(0)  # the client leaves: the broker drops its jobs at the liveness window
    return {"sent": count, "input_bytes": size, "send_s": round(send_s, 2), "refused_busy": refused}


def phase(sampler: Sampler, address: str, count: int, size: int, after_s: float) -> dict:
    start = time.monotonic()
    before = rss_mib(sampler.pid)
    result = flood(address, count, size)
    flood_end = time.monotonic()
    held_peak = sampler.stats.get("admission", {}).get("held_jobs", 0)
    time.sleep(after_s)  # watch the broker give memory back (the benchmark's own clock, not a test)
    during = [r for t, r in sampler.rss if start <= t <= flood_end + 25]
    after = [r for t, r in sampler.rss if t >= flood_end + after_s - 1]
    return {**result, "rss_before_mib": round(before, 1), "rss_peak_mib": round(max(during), 1),
            "rss_after_mib": round(after[-1] if after else rss_mib(sampler.pid), 1), "after_s": after_s,
            "held_jobs_seen": held_peak,
            "accepted_total": sampler.stats.get("accepted"), "jobs_dropped_total": sampler.stats.get("jobs_dropped")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=50_000, help="requests of 1 KiB in the first flood")
    parser.add_argument("--large", type=int, default=20_000, help="requests of 100 KiB in the second flood")
    parser.add_argument("--after-s", type=float, default=60.0, help="seconds to watch the RSS after each flood")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    port = free_base_port()
    endpoints = Endpoints.from_base("127.0.0.1", port)
    broker = subprocess.Popen([sys.executable, "-m", "geomgen", "broker", "--host", "127.0.0.1", "--port", str(port),
                               "--no-worker-timeout", "3600"], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)  # the broker binds
        sampler = Sampler(broker.pid, endpoints.client)
        sampler.start()
        phases = [phase(sampler, endpoints.client, args.small, 1024, args.after_s),
                  phase(sampler, endpoints.client, args.large, 100 * 1024, args.after_s)]
        sampler.stop.set()
        sampler.join()
    finally:
        broker.terminate()
        broker.wait(10)
    health = sorted(sampler.health_ms)
    report = {
        "machine": machine(),
        "phases": phases,
        "health_ms": {"p50": round(statistics.median(health), 2), "p99": round(health[int(0.99 * (len(health) - 1))], 2),
                      "max": round(health[-1], 2), "queries": len(health), "unanswered_5s": sampler.health_missed},
        "command": " ".join(["python", *sys.argv]),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
