"""``geomgen report DIR``: one offline HTML page, ``DIR/index.html``, with a row
per SDF package found under DIR (its preview, mass, size, collision pieces,
the Drake and MuJoCo checks, warnings), read from each package's manifest.

The page is self-contained (inline CSS and a few lines of JS to sort by a
column) and links the previews relatively, so it opens from the file system
with no network and moves with the folder.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

import geomgen

REPORT_FILE = "index.html"
TEMPLATE = "report.html.j2"
CHECKS = ("drake", "mujoco")  # the simulators a package is checked in, in the table's order


@dataclass
class CheckCell:
    status: str  # "passed", "failed", "skipped" or "not run"
    detail: str = ""


@dataclass
class AssetRow:
    """One package as the report shows it. Sizes in metres, mass in kilograms,
    paths relative to the report's folder (POSIX, for links)."""

    name: str
    sdf: str
    preview: str | None
    mass_kg: float | None
    size_m: list[float] | None  # x, y, z extents of the visual, Drake body frame (+Z up)
    pieces: int | None
    method: str
    checks: dict[str, CheckCell]
    warnings: list[str] = field(default_factory=list)
    seconds: float | None = None

    @property
    def largest_m(self) -> float | None:
        return max(self.size_m) if self.size_m else None


def find_manifests(root: Path) -> list[Path]:
    """Every package manifest under ``root``: ``<name>/<name>.json`` beside a
    ``<name>/<name>.sdf``. Hidden folders (a package still being written,
    ``.name.partial-*``) are skipped. Sorted by path."""
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        name = Path(folder).name
        if f"{name}.json" in files and f"{name}.sdf" in files:
            found.append(Path(folder) / f"{name}.json")
    return sorted(found)


def asset_row(manifest_path: Path, root: Path) -> AssetRow:
    """The report's row for the package whose manifest is ``manifest_path``;
    a manifest that cannot be read gives a row that says so."""
    package = manifest_path.parent
    relative = package.relative_to(root).as_posix()
    sdf = f"{relative}/{package.name}.sdf"
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return AssetRow(name=package.name, sdf=sdf, preview=None, mass_kg=None, size_m=None, pieces=None,
                        method="", checks={c: CheckCell("not run") for c in CHECKS},
                        warnings=[f"unreadable manifest {manifest_path.name}: {exc}"])
    preview_name = manifest.get("preview")
    preview = (f"{relative}/{preview_name}" if isinstance(preview_name, str)
               and (package / preview_name).is_file() else None)
    size = manifest.get("bbox_m")
    return AssetRow(
        name=str(manifest.get("name", package.name)),
        sdf=sdf,
        preview=preview,
        mass_kg=_number(manifest.get("mass_kg")),
        size_m=[float(v) for v in size] if isinstance(size, list) and len(size) == 3 else None,
        pieces=manifest.get("pieces") if isinstance(manifest.get("pieces"), int) else None,
        method=str(manifest.get("method", "")),
        checks=_checks(manifest),
        warnings=[str(w) for w in manifest.get("warnings") or []],
        seconds=_number(manifest.get("seconds")),
    )


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _checks(manifest: dict) -> dict[str, CheckCell]:
    """Each simulator's check; manifests written before checks were recorded
    have only ``validated`` (Drake)."""
    recorded = manifest.get("checks") if isinstance(manifest.get("checks"), dict) else {}
    cells = {}
    for name in CHECKS:
        check = recorded.get(name)
        if isinstance(check, dict) and isinstance(check.get("status"), str):
            cells[name] = CheckCell(check["status"], str(check.get("detail", "")))
        elif name == "drake" and "validated" in manifest:
            cells[name] = CheckCell("passed" if manifest["validated"] else "not run")
        elif name == "mujoco" and "mjcf" not in (manifest.get("formats") or {}):
            cells[name] = CheckCell("not run", "no MJCF in the package (--format mjcf)")
        else:
            cells[name] = CheckCell("not run")
    return cells


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("geomgen", "templates"),
                              autoescape=jinja2.select_autoescape(default=True), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


def render_report(rows: list[AssetRow], title: str) -> str:
    """The page's HTML for ``rows``."""
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return _environment().get_template(TEMPLATE).render(
        rows=rows, title=title, checks=CHECKS, generated=generated, version=geomgen.__version__,
        warned=sum(bool(r.warnings) for r in rows),
        failed=sum(any(c.status == "failed" for c in r.checks.values()) for r in rows))


def write_report(root: Path) -> tuple[Path, int]:
    """Write ``root/index.html`` for every package under ``root``; returns its
    path and the number of packages. OSError if the folder cannot be written."""
    root = Path(root)
    rows = [asset_row(path, root) for path in find_manifests(root)]
    path = root / REPORT_FILE
    partial = root / f".{REPORT_FILE}.partial"
    partial.write_text(render_report(rows, title=f"geomgen assets in {root.resolve().name or root.resolve()}"),
                       encoding="utf-8")
    partial.replace(path)  # a reader never sees half a page
    return path, len(rows)
