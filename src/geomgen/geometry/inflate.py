"""Inflate a 2-D silhouette into a closed solid (pure numpy/scipy).

The silhouette backend's geometry: a mask in, one closed, consistently wound
2-manifold out, with a rounded rim and, by default, a flat base to stand on.
"""

from __future__ import annotations

import numpy as np

BASE_BAND_FRACTION = 0.03  # the lowest 3 % of the object's height becomes its flat footprint
SMOOTHING_PX = 1.0  # Gaussian sigma on the signed distance, grid px: no pixel staircase on the outline


def inflate(mask: np.ndarray, depth_ratio: float = 1.0, flat_base: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A closed surface around ``mask`` (bool, shape (rows, cols), False on its border).

    The outline is the zero line of the mask's smoothed signed distance d,
    traced through a triangulated pixel grid (marching triangles: each grid
    triangle is clipped to the inside, crossing points shared along grid
    edges). The front is that triangulation lifted to ``z = t`` and the back is
    its mirror at ``z = -t``, with ``t = depth_ratio * sqrt(d * (2R - d))``, R
    the largest inscribed radius: a disc becomes a sphere, and the surface
    meets the outline steeply, so the rim is rounded. Rim points have t = 0 and
    belong to both halves.

    With ``flat_base`` the lowest BASE_BAND_FRACTION of the object is replaced
    by its footprint (the union of those rows) and the distance is measured as
    if the object went on below, so the bottom keeps its full depth; the solid
    is cut there by a flat face in the plane of the lowest row, and an upright
    object stands on it instead of rocking on a rounded rim.

    Returns ``(vertices, faces)``: vertices (n, 3) as (row, col, z) in grid
    pixels, z > 0 facing the viewer; faces (m, 3) int, counter-clockwise seen
    from outside. The surface is closed by construction (about 4 faces per
    pixel of the object).
    """
    rows, cols = mask.shape
    row_index = np.arange(rows, dtype=np.float64)[:, None]
    if flat_base:
        signed, bottom = _signed_distance_with_base(mask)
        # Inside = inside the outline and above the lower edge of the lowest row.
        clip = np.minimum(signed, (bottom + 0.5) - row_index)
    else:
        signed = _signed_distance(mask)
        clip = signed
    # No grid point exactly on the boundary, so every crossing lies strictly inside an edge.
    clip[np.abs(clip) < 1e-6] = -1e-6
    front, crossing_rc, crossing_d, grid_ids = _marching_triangles(clip, signed)

    radius = max(float(signed.ravel()[grid_ids].max()), 0.5)

    def half_depth(d: np.ndarray) -> np.ndarray:
        d = np.clip(d, 0.0, radius)
        return depth_ratio * np.sqrt(d * (2.0 * radius - d))

    grid_rc = np.column_stack([grid_ids // cols, grid_ids % cols]).astype(np.float64)
    grid_t = half_depth(signed.ravel()[grid_ids])
    cross_t = half_depth(crossing_d)
    cross_t[crossing_d <= 1e-9] = 0.0  # on the rim: shared by front and back
    n_grid, n_cross = len(grid_ids), len(crossing_rc)

    # Front ids: grid points, then crossings. The back gets new ids for every
    # point off the rim; rim points keep theirs so the halves join.
    split = np.nonzero(cross_t > 0.0)[0]
    back_id = np.arange(n_grid + n_cross)
    back_id[:n_grid] = n_grid + n_cross + np.arange(n_grid)
    back_id[n_grid + split] = 2 * n_grid + n_cross + np.arange(len(split))
    back = back_id[front][:, ::-1]
    walls = _walls(front, back_id)
    vertices = np.concatenate(
        [
            np.column_stack([grid_rc, grid_t]),
            np.column_stack([crossing_rc, cross_t]),
            np.column_stack([grid_rc, -grid_t]),
            np.column_stack([crossing_rc[split], -cross_t[split]]),
        ]
    )
    return vertices, np.concatenate([front, back, walls])


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(mask) - 0.5
    outside = ndimage.distance_transform_edt(~mask) - 0.5
    return ndimage.gaussian_filter(np.where(mask, inside, -outside), sigma=SMOOTHING_PX)


def _signed_distance_with_base(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Signed distance of the mask with its lowest band made a footprint that
    continues below the image, so the base is not a rim; and the lowest row."""
    filled = np.nonzero(mask.any(axis=1))[0]
    top, bottom = int(filled[0]), int(filled[-1])
    band = max(1, int(round(BASE_BAND_FRACTION * (bottom - top + 1))))
    footprint = mask[bottom - band + 1 : bottom + 1].any(axis=0)
    rows = mask.shape[0]
    below = max(mask.shape) // 2 + 2  # deeper than any inscribed radius
    extended = np.concatenate([mask[: bottom - band + 1], np.repeat(footprint[None, :], band + below, axis=0)])
    return _signed_distance(extended)[:rows], bottom


def _marching_triangles(clip: np.ndarray, signed: np.ndarray):
    """Triangulate {clip > 0} on the pixel grid.

    Returns ``(faces, crossing_rc, crossing_d, grid_ids)``: faces (m, 3) with
    ids 0..len(grid_ids)-1 for grid points and len(grid_ids)+k for crossing k,
    counter-clockwise in (x = col, y = -row); crossing positions (k, 2) as
    (row, col); ``signed`` interpolated at each crossing (k,); the flat grid
    index of each used grid point.
    """
    rows, cols = clip.shape
    values = clip.ravel()
    ids = np.arange(rows * cols).reshape(rows, cols)
    v00, v01, v10, v11 = ids[:-1, :-1].ravel(), ids[:-1, 1:].ravel(), ids[1:, :-1].ravel(), ids[1:, 1:].ravel()
    tris = np.concatenate([np.column_stack([v00, v10, v11]), np.column_stack([v00, v11, v01])])
    positive = values[tris] > 0.0
    count = positive.sum(axis=1)
    # One corner inside: (p, a, b) -> (p, e(p, a), e(p, b)). Two: (n, p1, p2)
    # -> quad e(n, p1), p1, p2, e(n, p2). Rolling the odd corner first keeps the winding.
    one = _roll_first(tris[count == 1], positive[count == 1].argmax(axis=1))
    two = _roll_first(tris[count == 2], positive[count == 2].argmin(axis=1))
    pairs = np.sort(np.concatenate([one[:, [0, 1]], one[:, [0, 2]], two[:, [0, 1]], two[:, [0, 2]]]), axis=1)
    keys, edge_of = np.unique(pairs[:, 0] * (rows * cols) + pairs[:, 1], return_inverse=True)
    n1, n2 = len(one), len(two)
    crossing = rows * cols + edge_of.ravel()  # temporary ids after every grid point
    faces = np.concatenate(
        [
            tris[count == 3],
            np.column_stack([one[:, 0], crossing[:n1], crossing[n1 : 2 * n1]]),
            np.column_stack([crossing[2 * n1 : 2 * n1 + n2], two[:, 1], two[:, 2]]),
            np.column_stack([crossing[2 * n1 : 2 * n1 + n2], two[:, 2], crossing[2 * n1 + n2 :]]),
        ]
    )
    first, second = keys // (rows * cols), keys % (rows * cols)
    weight = values[first] / (values[first] - values[second])
    first_rc = np.column_stack([first // cols, first % cols]).astype(np.float64)
    second_rc = np.column_stack([second // cols, second % cols]).astype(np.float64)
    crossing_rc = first_rc + weight[:, None] * (second_rc - first_rc)
    flat_signed = signed.ravel()
    crossing_d = flat_signed[first] + weight * (flat_signed[second] - flat_signed[first])

    grid_ids = np.unique(faces[faces < rows * cols])
    remap = np.empty(rows * cols + len(keys), dtype=np.int64)
    remap[grid_ids] = np.arange(len(grid_ids))
    remap[rows * cols :] = len(grid_ids) + np.arange(len(keys))
    return remap[faces], crossing_rc, crossing_d, grid_ids


def _roll_first(tris: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Rotate each row of ``tris`` (m, 3) cyclically so column ``first[i]`` leads."""
    order = (first[:, None] + np.arange(3)[None, :]) % 3
    return np.take_along_axis(tris, order, axis=1)


def _walls(front: np.ndarray, back_id: np.ndarray) -> np.ndarray:
    """Faces joining the front's boundary to the back's where they do not share
    points (the flat base): each boundary edge a -> b of the front becomes the
    quad b, a, a', b' (primes on the back), minus triangles that collapse at
    shared rim points. Winding follows the front's, so the result stays consistent."""
    edges = np.concatenate([front[:, [0, 1]], front[:, [1, 2]], front[:, [2, 0]]])
    keys = np.sort(edges, axis=1)
    _, index, counts = np.unique(keys[:, 0] * (int(front.max()) + 1) + keys[:, 1], return_index=True, return_counts=True)
    boundary = edges[index[counts == 1]]
    a, b = boundary[:, 0], boundary[:, 1]
    a_back, b_back = back_id[a], back_id[b]
    first = np.column_stack([b, a, a_back])[a_back != a]
    second = np.column_stack([b, a_back, b_back])[b_back != b]
    return np.concatenate([first, second]).reshape(-1, 3)
