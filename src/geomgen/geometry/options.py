"""Options of a GLB -> SDF conversion, as a dataclass and as a wire dict.

The same options are CLI flags of ``geomgen convert`` / ``generate`` and fields
of a request; ``from_dict`` validates a peer's dict and raises InputError with a
sentence naming the bad field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from geomgen.errors import InputError

COLLISION_METHODS = ("coacd", "vhacd", "hull")


@dataclass
class ConvertOptions:
    """How to turn a GLB into a Drake SDF package.

    Frames: ``dimensions`` are x, y, z of the Drake body frame (+Z up), metres.
    Mass: ``mass_kg`` wins over ``density_kg_m3``, which wins over ``material``;
    with none of them the density defaults to defaults.DENSITY_KG_M3.
    """

    up_axis: str = "y"  # up axis of the input mesh: "y" (glTF) or "z" (many CAD/OBJ/STL files)
    mass_kg: float | None = None
    density_kg_m3: float | None = None
    material: str | None = None  # name in geomgen.geometry.materials
    mu: float | None = None  # Coulomb friction; default from the material
    dimensions: list[float] | None = None  # target bounding box, uniform scale to fit
    scale: float | None = None  # uniform scale, used when dimensions is None
    collision: str = "coacd"  # coacd | vhacd | hull
    collision_params: dict = field(default_factory=dict)  # method-specific parameters
    simplify_faces: int | None = None  # decimate to this many faces before decomposition; None: decomposition.DEFAULT_DECOMPOSITION_FACES
    remove_floaters: bool = True  # drop small disconnected pieces
    hydroelastic: bool = False  # write compliant hydroelastic properties
    hydroelastic_modulus_pa: float | None = None  # default from the material
    decomposition_timeout_s: float = 300.0  # a decomposition running longer falls back
    validate: bool = True  # load the SDF in Drake after writing, when pydrake is installed

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _field_names(type(self))}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ConvertOptions":
        data = dict(data or {})
        unknown = sorted(set(data) - set(_field_names(cls)))
        if unknown:
            raise InputError(f"unknown conversion option(s): {', '.join(unknown)}", code="bad_option")
        opts = cls(**data)
        opts.check()
        return opts

    def check(self) -> None:
        """Raise InputError if any field is out of range or of the wrong type."""
        for name in ("mass_kg", "density_kg_m3", "scale", "hydroelastic_modulus_pa"):
            _positive(name, getattr(self, name))
        _positive("decomposition_timeout_s", self.decomposition_timeout_s)
        if self.mu is not None and (not _is_number(self.mu) or self.mu < 0 or not math.isfinite(self.mu)):
            raise InputError(f"mu must be a finite number >= 0, got {self.mu!r}", code="bad_option")
        if self.dimensions is not None:
            dims = self.dimensions
            if not isinstance(dims, (list, tuple)) or len(dims) != 3:
                raise InputError("dimensions must be three numbers x y z in metres", code="bad_option")
            for d in dims:
                _positive("dimensions", d)
            self.dimensions = [float(d) for d in dims]
        if self.up_axis not in ("y", "z"):
            raise InputError(f"up_axis must be 'y' or 'z', got {self.up_axis!r}", code="bad_option")
        if self.collision not in COLLISION_METHODS:
            raise InputError(
                f"collision must be one of {', '.join(COLLISION_METHODS)}, got {self.collision!r}",
                code="bad_option",
            )
        if not isinstance(self.collision_params, dict):
            raise InputError("collision_params must be a map of parameter -> value", code="bad_option")
        if self.simplify_faces is not None and (
            not isinstance(self.simplify_faces, int) or isinstance(self.simplify_faces, bool) or self.simplify_faces < 4
        ):
            raise InputError("simplify_faces must be an integer >= 4", code="bad_option")
        if self.material is not None:
            from geomgen.geometry.materials import MATERIALS

            if self.material not in MATERIALS:
                raise InputError(
                    f"unknown material {self.material!r}; known: {', '.join(sorted(MATERIALS))}",
                    code="bad_option",
                )
        for name in ("remove_floaters", "hydroelastic", "validate"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false", code="bad_option")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(name: str, value: Any) -> None:
    if value is None:
        return
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value!r}", code="bad_option")


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    """A dataclass's field names, looked up once (the broker checks options per request)."""
    return tuple(f.name for f in dataclasses.fields(cls))
