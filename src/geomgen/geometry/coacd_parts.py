"""CoACD on a solid cut into parts, the parts decomposed side by side in
worker processes.

Why: CoACD cuts a solid round by round, every part of a round in an OpenMP
loop, and each round waits for its slowest part; its final merge is mostly
serial. On two cores it ran 1.4x faster than on one. Parts decomposed in
separate processes, one thread each, keep every core busy to the end, and a
part's tree search works on fewer faces. On the five reference meshes this
took CoACD's share of a conversion from 32.7 s to about 18 s on two cores
(BENCHMARKS.md, "SDF conversion").

How:

1. :func:`split_solid` halves the solid with a plane across its longest side,
   at the median of its face centres, until every part has at most
   ``part_faces`` faces (manifold3d's plane split, so every part is a closed
   solid); each connected piece of a part is a part of its own.
2. :func:`part_params`: CoACD scales every mesh it is given to [-1, 1] by its
   longest side and measures concavity there, so a part's ``threshold`` is the
   solid's times (solid's longest side / part's longest side). The concavity
   allowed, in metres, is the one the caller asked for on the whole solid.
3. :func:`decompose_parts` runs the parts, largest first, in worker processes
   (``python -m geomgen.geometry.coacd_parts``, one OpenMP thread each), as
   many at once as :func:`decomposition_processes` says; with one, in this
   process. The pieces are the same either way, returned in a fixed order.

The pieces of neighbouring parts are joined afterwards by
:mod:`geomgen.geometry.hull_merge` (a part's pieces never see the others').
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import selectors
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import BinaryIO

import msgpack
import numpy as np

from geomgen.geometry.decomposition import RungFailed

MAX_PARTS = 64  # a bound on the halving, whatever part_faces asks
_FRAME = struct.Struct("<Q")  # each message between parent and worker: its length, then msgpack bytes
_WORKER_MODULE = "geomgen.geometry.coacd_parts"

Mesh = tuple[np.ndarray, np.ndarray]  # vertices (N, 3) float, faces (M, 3) int


def decomposition_processes() -> int:
    """How many parts may be decomposed at once: OMP_NUM_THREADS when set (as
    ``geomgen sdf-worker --procs N`` sets it, cores // N, so a full pool of
    conversions does not oversubscribe the cores), else the CPUs this process
    may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def longest_side(vertices: np.ndarray) -> float:
    """The longest side of the axis-aligned box around ``vertices`` (N, 3)."""
    return float(np.ptp(np.asarray(vertices, dtype=float), axis=0).max())


def split_solid(vertices: np.ndarray, faces: np.ndarray, part_faces: int) -> list[Mesh]:
    """The closed solid (N, 3), (M, 3) as closed parts of at most ``part_faces``
    faces each (at most MAX_PARTS parts; a part that cannot be halved is kept
    whole). A solid that is not a valid manifold, or one within the budget,
    comes back as the one part it is. Parts are ordered by where they lie, so
    the same solid always gives the same list."""
    faces = np.asarray(faces, dtype=np.int64)
    if part_faces <= 0 or len(faces) <= part_faces:
        return [(np.asarray(vertices, dtype=float), faces)]
    import manifold3d

    solid = manifold3d.Manifold(manifold3d.Mesh(np.asarray(vertices, dtype=np.float32),
                                                np.asarray(faces, dtype=np.uint32)))
    if solid.status() != manifold3d.Error.NoError or solid.is_empty():
        return [(np.asarray(vertices, dtype=float), faces)]
    pending, done = [solid], []
    while pending:
        part = pending.pop()
        if part.num_tri() <= part_faces or len(pending) + len(done) + 2 > MAX_PARTS:
            done.append(part)
            continue
        halves = _halve(part)
        if halves is None:
            done.append(part)
        else:
            pending.extend(halves)
    parts = [_to_arrays(piece) for part in done for piece in part.decompose()]
    parts = [(v, f) for v, f in parts if len(f) >= 4]
    if not parts:
        return [(np.asarray(vertices, dtype=float), faces)]
    return sorted(parts, key=lambda mesh: tuple(np.round(mesh[0].mean(axis=0), 9)))


def _halve(part):
    """The two halves of the manifold ``part`` across its longest side, at the
    median of its face centres; None when a half would be empty."""
    vertices, faces = _to_arrays(part)
    axis = int(np.argmax(np.ptp(vertices, axis=0)))
    offset = float(np.median(vertices[faces].mean(axis=1)[:, axis]))
    normal = [0.0, 0.0, 0.0]
    normal[axis] = 1.0
    above, below = part.split_by_plane(normal, offset)
    if above.is_empty() or below.is_empty():
        return None
    return [above, below]


def _to_arrays(manifold) -> Mesh:
    mesh = manifold.to_mesh()
    return (np.asarray(mesh.vert_properties, dtype=float)[:, :3].copy(),
            np.asarray(mesh.tri_verts, dtype=np.int64).copy())


def part_params(params: dict, solid_side_m: float, part_side_m: float) -> dict:
    """CoACD's parameters for one part: the solid's, with ``threshold`` scaled
    so that the concavity allowed in metres is the solid's (at most 1, CoACD's
    upper bound)."""
    threshold = float(params["threshold"]) * solid_side_m / max(part_side_m, 1e-12)
    return {**params, "threshold": min(1.0, threshold)}


def decompose_parts(parts: list[Mesh], params: dict, processes: int) -> list[np.ndarray]:
    """CoACD's pieces of every part, as hull vertex arrays (K, 3), in a fixed
    order (by part, then by each piece's centre). ``params`` are CoACD's own,
    for the whole solid (scaled per part here). One part, or one process: in
    this process; else in worker processes. Raises RungFailed when a worker
    dies or CoACD fails on a part."""
    solid_side_m = longest_side(np.vstack([vertices for vertices, _ in parts]))
    jobs = [(vertices, faces, part_params(params, solid_side_m, longest_side(vertices)))
            for vertices, faces in parts]
    if len(jobs) == 1 or processes <= 1:
        results = [run_coacd(*job) for job in jobs]
    else:
        results = _run_in_workers(jobs, min(processes, len(jobs)))
    return [piece for pieces in results for piece in sorted(pieces, key=_centre_key)]


def _centre_key(points: np.ndarray) -> tuple:
    return tuple(np.round(np.asarray(points).mean(axis=0), 9))


def run_coacd(vertices: np.ndarray, faces: np.ndarray, params: dict) -> list[np.ndarray]:
    """CoACD's pieces of one closed mesh, as vertex arrays (K, 3)."""
    import coacd

    coacd.set_log_level("error")
    parts = coacd.run_coacd(coacd.Mesh(np.ascontiguousarray(vertices, dtype=float),
                                       np.ascontiguousarray(faces, dtype=np.int32)), **params)
    return [np.asarray(piece_vertices, dtype=float) for piece_vertices, _ in parts]


# --- worker processes ---------------------------------------------------------------

# Workers started ahead of the decomposition (see workers_ahead), not yet taken.
_ahead: contextvars.ContextVar[list[subprocess.Popen] | None] = contextvars.ContextVar("geomgen_coacd_workers",
                                                                                        default=None)


@contextlib.contextmanager
def workers_ahead(count: int) -> Iterator[None]:
    """Start ``count`` worker processes now for a decomposition later in the
    block: a worker takes about 0.2 s to import numpy and CoACD, which then
    overlaps the loading and repair of the mesh. A decomposition in the block
    takes them; those it leaves are stopped when the block ends. ``count`` <= 1:
    nothing is started."""
    workers = [_spawn() for _ in range(count)] if count > 1 else []
    token = _ahead.set(workers)
    try:
        yield
    finally:
        _ahead.reset(token)
        for worker in workers:
            _stop(worker)


def _spawn() -> subprocess.Popen:
    """One worker process, with one OpenMP thread. It shares this process's group
    (a conversion killed at its deadline takes it along) and dies with it."""
    return subprocess.Popen([sys.executable, "-m", _WORKER_MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _take(count: int) -> list[subprocess.Popen]:
    """``count`` workers: those started ahead first, then new ones."""
    ahead = _ahead.get() or []
    taken = [ahead.pop() for _ in range(min(count, len(ahead)))]
    return taken + [_spawn() for _ in range(count - len(taken))]


def _run_in_workers(jobs: list[tuple[np.ndarray, np.ndarray, dict]], count: int) -> list[list[np.ndarray]]:
    """Each job's pieces, jobs handed out largest first to ``count`` worker
    processes as each becomes free."""
    order = sorted(range(len(jobs)), key=lambda index: -len(jobs[index][1]))
    workers = _take(count)
    results: list[list[np.ndarray] | None] = [None] * len(jobs)
    busy: dict[subprocess.Popen, int] = {}
    selector = selectors.DefaultSelector()
    try:
        for worker in workers:
            selector.register(worker.stdout, selectors.EVENT_READ, worker)
            if order:
                busy[worker] = order.pop(0)
                _send(worker, jobs[busy[worker]])
        while busy:
            for key, _ in selector.select():
                worker = key.data
                index = busy.pop(worker)
                results[index] = _answer(worker)
                if order:
                    busy[worker] = order.pop(0)
                    _send(worker, jobs[busy[worker]])
    finally:
        selector.close()
        for worker in workers:
            _stop(worker)
    return [pieces or [] for pieces in results]


def _send(worker: subprocess.Popen, job: tuple[np.ndarray, np.ndarray, dict]) -> None:
    vertices, faces, params = job
    message = {"vertices": np.ascontiguousarray(vertices, dtype="<f8").tobytes(),
               "faces": np.ascontiguousarray(faces, dtype="<i4").tobytes(), "params": params}
    try:
        _write_frame(worker.stdin, msgpack.packb(message, use_bin_type=True))
    except (BrokenPipeError, OSError):
        raise RungFailed(f"a decomposition process ended early ({_exit_text(worker)})") from None


def _answer(worker: subprocess.Popen) -> list[np.ndarray]:
    payload = _read_frame(worker.stdout)
    if payload is None:
        raise RungFailed(f"a decomposition process crashed ({_exit_text(worker)})")
    answer = msgpack.unpackb(payload, raw=False)
    if "error" in answer:
        raise RungFailed(answer["error"])
    return [np.frombuffer(piece, dtype="<f8").reshape(-1, 3).copy() for piece in answer["pieces"]]


def _exit_text(worker: subprocess.Popen) -> str:
    from geomgen.processes import describe_exit

    try:
        code = worker.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        return "still running"
    return describe_exit(code)


def _stop(worker: subprocess.Popen) -> None:
    """Close the worker's input (it ends at its next read) and reap it; kill
    it if it is still busy (an error elsewhere ended the decomposition)."""
    if worker.stdin.closed:
        return
    try:
        worker.stdin.close()
    except OSError:
        pass
    try:
        worker.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
    worker.stdout.close()


def _write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(_FRAME.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(head)
    payload = stream.read(size)
    return payload if len(payload) == size else None


def worker_main() -> None:
    """A worker process: read jobs (vertices, faces, CoACD parameters) from
    stdin, answer each with its pieces (or an error) on stdout, until stdin
    closes. Native code printing to stdout would corrupt the answers, so fd 1
    is pointed at stderr and the answers go to a copy of the original."""
    from geomgen.processes import die_with_parent

    die_with_parent()
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    jobs = sys.stdin.buffer
    while True:
        payload = _read_frame(jobs)
        if payload is None:
            return
        job = msgpack.unpackb(payload, raw=False)
        try:
            vertices = np.frombuffer(job["vertices"], dtype="<f8").reshape(-1, 3)
            faces = np.frombuffer(job["faces"], dtype="<i4").reshape(-1, 3)
            answer = {"pieces": [np.ascontiguousarray(piece, dtype="<f8").tobytes()
                                 for piece in run_coacd(vertices, faces, job["params"])]}
        except Exception as exc:  # noqa: BLE001 - CoACD's error fails this part; the parent falls down the ladder
            answer = {"error": f"CoACD failed on a part: {type(exc).__name__}: {exc}"}
        _write_frame(answers, msgpack.packb(answer, use_bin_type=True))


if __name__ == "__main__":
    worker_main()
