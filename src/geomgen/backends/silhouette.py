"""The ``silhouette`` backend: a CPU image -> closed, textured mesh.

A 2.5-D reconstruction: the object's outline from the alpha channel (or segmented
from a plain background), inflated front and back by a rounded profile of its
distance transform into one closed surface standing on a flat footprint, textured
with the image. The outline is right as seen from the front; the thickness, the
back and any concavity are guessed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from geomgen import defaults
from geomgen.backends._sam3_segmenter import SEGMENTER_OPTIONS
from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.errors import GenerateError, InputError
from geomgen.optionspec import OptionSpec

if TYPE_CHECKING:
    import PIL.Image
    import trimesh

DEPTH_RATIO = 1.0  # thickest depth / diameter of the outline's largest inscribed circle (1: a disc -> a sphere)
MESH_PX = 96  # long side of the grid the solid is built on, px: at most ~4 x 96^2 = 37k faces
TEXTURE_PX = 1024  # long side of the texture cropped from the input, px
WORK_PX = 256  # long side of the image the foreground is segmented at, px
BORDER_PX = 4  # width of the frame whose colour defines "background" (working px)
PLAIN_BORDER_FRACTION = 0.6  # share of the frame that must match the fitted background colour
BACKGROUND_TOLERANCE = 12.0  # colour distance (8-bit CIELAB units) still counted as background
MIN_OBJECT_FRACTION = 0.002  # smaller foregrounds are noise, not an object (share of the image)
MAX_OBJECT_FRACTION = 0.97  # a foreground this large is the whole picture, not an object
SMALL_HOLE_FRACTION = 0.02  # holes below this share of the object are segmentation specks and filled
PAD_PX = 3  # empty grid cells around the outline so the surface closes inside the grid

OPTIONS = (
    OptionSpec("height_m", "number", defaults.SILHOUETTE_HEIGHT_M, 1e-4, 1e3,
               help="height of the object, metres (an image carries no scale)"),
    OptionSpec("depth_ratio", "number", DEPTH_RATIO, 0.01, 10.0,
               help="thickest depth / diameter of the outline's largest inscribed circle"),
    OptionSpec("resolution", "integer", MESH_PX, 16, 512, help="long side of the grid the solid is built on, px"),
    OptionSpec("texture_px", "integer", TEXTURE_PX, 64, 4096, help="long side of the texture, px"),
    OptionSpec("flat_base", "switch", True, help="stand the solid on a flat footprint"),
    *SEGMENTER_OPTIONS,  # segmenter=sam3: SAM 3 cuts the object out (backends/_sam3_segmenter.py)
)


# --- foreground ------------------------------------------------------------------


def foreground_mask(image: "PIL.Image.Image", work_px: int = WORK_PX) -> tuple[np.ndarray, str]:
    """The object's silhouette at working resolution (long side ``work_px``).

    Returns ``(mask, method)``: a bool array (height, width), one connected
    component with small holes filled, and "alpha", "grabcut" or "threshold".
    Raises InputError ``no_object`` when no object can be told from its background.
    """
    import cv2

    rgba = np.asarray(image.convert("RGBA"))
    scale = min(1.0, work_px / max(rgba.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(rgba.shape[1] * scale)), max(1, round(rgba.shape[0] * scale)))
        rgba = cv2.resize(rgba, size, interpolation=cv2.INTER_AREA)
    alpha = rgba[..., 3]
    mask, method = None, ""
    if alpha.min() < 128:  # the alpha channel says something: trust it
        mask, method = alpha >= 128, "alpha"
        if mask.mean() > MAX_OBJECT_FRACTION:  # only a rim is transparent (rounded corners...)
            mask = None
    if mask is None:
        mask, method = _segment_plain_background(np.ascontiguousarray(rgba[..., :3]))
    return _clean(mask), method


def _segment_plain_background(rgb: np.ndarray) -> tuple[np.ndarray, str]:
    """Object vs a plain background: GrabCut seeded by each pixel's colour
    distance to the background fitted to the image's frame, falling back to
    that distance thresholded."""
    import cv2

    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    frame = np.zeros(rgb.shape[:2], dtype=bool)
    band = max(1, min(BORDER_PX, min(rgb.shape[:2]) // 8))
    frame[:band], frame[-band:], frame[:, :band], frame[:, -band:] = True, True, True, True
    distance = np.linalg.norm(lab - _background_model(lab, frame), axis=-1)
    if (distance[frame] < BACKGROUND_TOLERANCE).mean() < PLAIN_BORDER_FRACTION:
        raise InputError(
            "the image has no transparent background and its background is not plain, so the object "
            "cannot be told apart; give the image an alpha channel or shoot it on a plain background",
            code="no_object",
        )
    # Otsu on the distance separates background (near 0) from object; the clamp
    # keeps a nearly-background object and a noisy background both sensible.
    scaled = np.clip(distance * 2.0, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = float(np.clip(otsu / 2.0, 8.0, 30.0))
    rough = distance > threshold
    if not rough.any():
        return rough, "threshold"
    seeds = np.where(rough, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    seeds[frame & ~rough] = cv2.GC_BGD
    seeds[distance > 2.5 * threshold] = cv2.GC_FGD
    try:
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(rgb, seeds, None, bgd, fgd, 4, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # too few samples of one class for its colour model
        return rough, "threshold"
    cut = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    # GrabCut's smoothness term can shave thin parts (a lamp's stem); a cut
    # that lost most of the clear-cut object is worse than the threshold.
    overlap = (cut & rough).sum() / max(1, rough.sum())
    return (cut, "grabcut") if overlap > 0.8 else (rough, "threshold")


def _background_model(lab: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """The background's colour at every pixel, shape (rows, cols, 3): a quadratic
    in x and y fitted to the frame, so studio gradients and vignetting stay
    "plain". Fitted twice, the second time without frame pixels the first fit
    calls object (an object touching the border)."""
    rows, cols = frame.shape
    y, x = np.mgrid[0:rows, 0:cols]
    x = x / max(cols - 1, 1) * 2.0 - 1.0
    y = y / max(rows - 1, 1) * 2.0 - 1.0
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)
    samples, colours = basis[frame], lab[frame]
    use = np.ones(len(samples), dtype=bool)
    for _ in range(2):
        coeffs, *_ = np.linalg.lstsq(samples[use], colours[use], rcond=None)
        residual = np.linalg.norm(colours - samples @ coeffs, axis=-1)
        use = residual < max(BACKGROUND_TOLERANCE, 2.0 * float(np.median(residual)))
        if use.sum() < 6:
            break
    return basis @ coeffs


def _clean(mask: np.ndarray) -> np.ndarray:
    """Largest connected component, specks opened away, small holes filled."""
    import cv2
    from scipy import ndimage

    fraction = mask.mean()
    if fraction > MAX_OBJECT_FRACTION:
        raise InputError(
            "the foreground covers the whole image, so there is no outline to build from; "
            "give the image an alpha channel around the object or shoot it on a plain background",
            code="no_object",
        )
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
    labels, count = ndimage.label(opened)
    if count == 0 or fraction < MIN_OBJECT_FRACTION:
        raise InputError(
            "no object found in the image; give it an alpha channel (transparent background) "
            "or shoot the object on a plain background that contrasts with it",
            code="no_object",
        )
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(sizes.argmax()) + 1)
    if largest.sum() < max(25, MIN_OBJECT_FRACTION * mask.size):
        raise InputError(
            "the object in the image is too small to build from; crop the image around it, "
            "with an alpha channel or a plain background",
            code="no_object",
        )
    holes, hole_count = ndimage.label(ndimage.binary_fill_holes(largest) & ~largest)
    if hole_count:
        hole_sizes = np.bincount(holes.ravel())
        small = hole_sizes < SMALL_HOLE_FRACTION * largest.sum()
        small[0] = False
        largest |= small[holes]
    return largest


# --- solid -----------------------------------------------------------------------


def silhouette_mesh(
    image: "PIL.Image.Image",
    height_m: float = defaults.SILHOUETTE_HEIGHT_M,
    depth_ratio: float = DEPTH_RATIO,
    resolution: int = MESH_PX,
    texture_px: int = TEXTURE_PX,
    flat_base: bool = True,
) -> tuple["trimesh.Trimesh", dict]:
    """Image -> closed textured mesh, +Y up, ``height_m`` tall, resting on y = 0, centred.

    Returns ``(mesh, info)``; info holds the segmentation method and sizes.
    The front (+Z) shows the image with UVs equal to image coordinates; the
    back shows it mirrored; with ``flat_base`` it stands on a flat footprint
    (see geometry.inflate). Raises InputError ``no_object``.
    """
    import PIL.Image
    import trimesh

    from geomgen.geometry.inflate import inflate

    work_mask, method = foreground_mask(image)
    scale = work_mask.shape[1] / image.width  # working px per image px
    rows, cols = np.nonzero(work_mask)
    # Object box in image pixels, one working pixel of margin so the outline is inside it.
    x0 = max(0.0, (cols.min() - 1) / scale)
    y0 = max(0.0, (rows.min() - 1) / scale)
    x1 = min(float(image.width), (cols.max() + 2) / scale)
    y1 = min(float(image.height), (rows.max() + 2) / scale)
    grid_scale = resolution / max(x1 - x0, y1 - y0)  # grid px per image px
    grid_w = max(2, round((x1 - x0) * grid_scale))
    grid_h = max(2, round((y1 - y0) * grid_scale))

    coverage = PIL.Image.fromarray(work_mask.astype(np.uint8) * 255).resize(
        (grid_w, grid_h), PIL.Image.BILINEAR, box=(x0 * scale, y0 * scale, x1 * scale, y1 * scale)
    )
    grid = np.pad(np.asarray(coverage) >= 128, PAD_PX)
    if grid.sum() < 4:
        raise InputError("the object is too small in the image to build a solid; crop the image around it", code="no_object")
    vertices, faces = inflate(grid, depth_ratio, flat_base)

    # Grid (row, col) -> texture UV of the object box: u right, v up (trimesh
    # stores OpenGL-style v and flips it when writing glTF).
    u = (vertices[:, 1] - PAD_PX + 0.5) / grid_w
    v = 1.0 - (vertices[:, 0] - PAD_PX + 0.5) / grid_h
    uv = np.clip(np.column_stack([u, v]), 0.0, 1.0)
    texture = _texture(image, work_mask, (x0, y0, x1, y1), scale, texture_px)
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=texture, metallicFactor=0.0, roughnessFactor=0.9, doubleSided=False
    )
    # (row, col, z) -> (x right, y up, z towards the viewer): a proper rotation, winding kept.
    points = np.column_stack([vertices[:, 1], -vertices[:, 0], vertices[:, 2]])
    mesh = trimesh.Trimesh(
        vertices=points, faces=faces, visual=trimesh.visual.TextureVisuals(uv=uv, material=material), process=False
    )
    extent_y = float(np.ptp(points[:, 1]))
    mesh.apply_scale(height_m / extent_y)
    low, high = mesh.bounds
    mesh.apply_translation([-(low[0] + high[0]) / 2.0, -low[1], -(low[2] + high[2]) / 2.0])
    info = {
        "segmentation": method,
        "flat_base": flat_base,
        "grid_px": [grid_w, grid_h],
        "texture_px": list(texture.size),
        "faces": len(mesh.faces),
        "extents_m": [round(float(e), 6) for e in mesh.extents],
    }
    return mesh, info


def _texture(image: "PIL.Image.Image", work_mask: np.ndarray, box: tuple, scale: float, texture_px: int) -> "PIL.Image.Image":
    """The object box of ``image`` as RGB, at most ``texture_px`` on its long side,
    background pixels replaced by the nearest object colour so filtering at the
    outline does not bleed the background (often black under alpha) onto the sides."""
    import PIL.Image
    from scipy import ndimage

    x0, y0, x1, y1 = box
    factor = min(1.0, texture_px / max(x1 - x0, y1 - y0))
    size = (max(1, round((x1 - x0) * factor)), max(1, round((y1 - y0) * factor)))
    rgb = np.asarray(image.convert("RGB").resize(size, PIL.Image.LANCZOS, box=box)).copy()
    inside = np.asarray(
        PIL.Image.fromarray(work_mask.astype(np.uint8) * 255).resize(
            size, PIL.Image.BILINEAR, box=(x0 * scale, y0 * scale, x1 * scale, y1 * scale)
        )
    ) >= 192
    if inside.any() and not inside.all():
        _, (near_r, near_c) = ndimage.distance_transform_edt(~inside, return_indices=True)
        rgb = rgb[near_r, near_c]
    return PIL.Image.fromarray(np.ascontiguousarray(rgb), "RGB")


class SilhouetteBackend(Backend):
    """Image in, inflated-silhouette solid out, on the CPU (see module docstring)."""

    name = "silhouette"
    input_kind = "image"
    uses_gpu = False
    options_spec = OPTIONS
    _segmenter = None  # SAM 3, with segmenter=sam3

    def load(self) -> None:
        """Load SAM 3 once when ``segmenter=sam3``; nothing otherwise."""
        from geomgen.backends._sam3_segmenter import load_for_backend

        self._segmenter = load_for_backend(self.name, self.resolve_options(self.options))

    def generate(self, job: GenerationInput) -> GenerationOutput:
        import trimesh

        from geomgen.geometry.meshio import export_glb
        from geomgen.inputs import decode_image

        opts = self.resolve_options(self.options, job.options)
        segmenter_options = {spec.name: opts.pop(spec.name) for spec in SEGMENTER_OPTIONS}
        from geomgen.backends._sam3_segmenter import refuse_unused

        refuse_unused(self.name, segmenter_options["segmenter"], self.options, job.options)
        started = time.perf_counter()
        image = decode_image(job.input_data, job.input_name)
        job.progress("image decoded")
        segmentation, debug = {}, {}
        if segmenter_options["segmenter"] == "sam3":
            from geomgen.backends._sam3_segmenter import cut_out

            if self._segmenter is None:
                raise GenerateError("segmenter=sam3 but SAM 3 was not loaded; the worker must call load() first",
                                    code="backend_not_loaded")
            job.progress("segmenting with SAM 3")
            image, segmentation, debug = cut_out(self._segmenter, image, job.input_name,
                                                 segmenter_options["text_prompt"],
                                                 segmenter_options["sam3_threshold"], job.debug)
        mesh, info = silhouette_mesh(image, **opts)
        if segmentation:
            info["segmentation"] = f"sam3:{segmentation['mode']}"
            info["sam3"] = segmentation
        if not mesh.is_watertight:  # the construction guarantees it; never ship a leaky solid
            raise GenerateError("the silhouette solid is not closed; try another resolution", code="not_watertight")
        glb = export_glb(trimesh.Scene(mesh))
        info["seconds"] = round(time.perf_counter() - started, 4)
        info["height_m"] = opts["height_m"]
        return GenerationOutput(glb=glb, info=info, debug_files=debug)
