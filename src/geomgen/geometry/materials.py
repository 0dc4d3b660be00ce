"""Common materials: density, Coulomb friction and hydroelastic modulus.

Densities are typical bulk values of finished objects (kg/m^3); friction is a
dry coefficient against common floors; moduli are the compliant-hydroelastic
modulus Drake expects (Pa), softened from Young's modulus as Drake's examples
do for stable contact.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Material:
    density_kg_m3: float
    mu: float
    hydroelastic_modulus_pa: float


MATERIALS: dict[str, Material] = {
    "wood": Material(600.0, 0.5, 1.0e7),
    "metal": Material(7800.0, 0.4, 1.0e8),
    "aluminum": Material(2700.0, 0.4, 7.0e7),
    "plastic": Material(1000.0, 0.4, 5.0e6),
    "fabric": Material(300.0, 0.7, 1.0e5),
    "ceramic": Material(2400.0, 0.5, 5.0e7),
    "glass": Material(2500.0, 0.4, 5.0e7),
    "rubber": Material(1100.0, 0.9, 1.0e6),
    "paper": Material(700.0, 0.5, 1.0e6),
    "cardboard": Material(200.0, 0.5, 5.0e5),
    "stone": Material(2600.0, 0.6, 5.0e7),
    "foam": Material(50.0, 0.8, 5.0e4),
    "leather": Material(900.0, 0.6, 1.0e6),
}
DEFAULT_MU = 0.5
DEFAULT_HYDROELASTIC_MODULUS_PA = 1.0e7
