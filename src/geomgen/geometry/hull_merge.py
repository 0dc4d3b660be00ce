"""Join neighbouring convex pieces while the volume they add stays small.

Collision pieces are judged by how much space they claim that the object does
not fill (the collision IoU of BENCHMARKS.md). Replacing two pieces by the hull
of both claims the hull's volume less theirs, so the merges are taken cheapest
first until that added volume would exceed a fraction of the solid's volume:
the budget bounds what merging can cost the IoU (about the same fraction).

Only pieces whose boxes touch (within 1% of the object's size) are tried, so
two pieces far apart are never bridged by a thin hull across empty space.
CoACD's own merge measures every pair's concavity on sampled surfaces; this
one needs a hull of two small point sets per pair (qhull) and takes well under
a second for a few hundred pieces.
"""

from __future__ import annotations

import heapq

import numpy as np

NEIGHBOUR_GAP = 0.01  # boxes closer than this fraction of the object's size are neighbours


def _hull(points: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The hull's vertices (K, 3) and volume (m^3) of ``points`` (N, 3); None
    for a flat or degenerate set."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):
        return None
    return points[hull.vertices], float(hull.volume)


def merge_hulls(pieces: list[np.ndarray], volume_m3: float, budget: float) -> list[np.ndarray]:
    """``pieces`` (vertex arrays (K, 3) of convex hulls) with neighbours
    merged, cheapest first, while the total volume added stays within
    ``budget`` * ``volume_m3``. Returns hull vertex arrays, the merged ones
    where their first piece was (the order is otherwise kept)."""
    if budget <= 0 or volume_m3 <= 0 or len(pieces) < 2:
        return list(pieces)
    points: list[np.ndarray] = []
    volumes: list[float] = []
    for piece in pieces:
        hull = _hull(np.asarray(piece, dtype=float))
        points.append(hull[0] if hull else np.asarray(piece, dtype=float))
        volumes.append(hull[1] if hull else 0.0)
    low = np.array([p.min(axis=0) for p in points])
    high = np.array([p.max(axis=0) for p in points])
    gap_m = NEIGHBOUR_GAP * float((high.max(axis=0) - low.min(axis=0)).max())
    alive = [True] * len(points)
    version = [0] * len(points)
    candidates: list[tuple[float, int, int, int, int]] = []

    def neighbours(i: int) -> np.ndarray:
        touching = np.all(low[i] - gap_m <= high, axis=1) & np.all(low - gap_m <= high[i], axis=1)
        touching[i] = False
        return np.flatnonzero(touching & np.array(alive))

    def consider(i: int, j: int) -> None:
        hull = _hull(np.vstack([points[i], points[j]]))
        if hull is not None:
            added_m3 = max(0.0, hull[1] - volumes[i] - volumes[j])
            first, second = min(i, j), max(i, j)
            heapq.heappush(candidates, (added_m3, first, second, version[first], version[second]))

    for i in range(len(points)):
        for j in neighbours(i):
            if j > i:
                consider(i, int(j))
    allowed_m3 = budget * volume_m3
    spent_m3 = 0.0
    while candidates:
        added_m3, i, j, version_i, version_j = heapq.heappop(candidates)
        if not (alive[i] and alive[j]) or version[i] != version_i or version[j] != version_j:
            continue  # a piece of this pair has changed since it was priced
        if spent_m3 + added_m3 > allowed_m3:
            break
        hull = _hull(np.vstack([points[i], points[j]]))
        if hull is None:
            continue
        spent_m3 += added_m3
        points[i], volumes[i] = hull
        low[i], high[i] = points[i].min(axis=0), points[i].max(axis=0)
        alive[j] = False
        version[i] += 1
        for k in neighbours(i):
            consider(i, int(k))
    return [p for p, kept in zip(points, alive) if kept]
