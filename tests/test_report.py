"""`geomgen report DIR`: the rows read from real packages, and the page loaded
in headless Chromium (Debian's chromium and chromium-driver, driven by
selenium): a screenshot, its content, no console errors, sorting by a click.

Outside CI a machine without Chromium skips the browser test, saying why; in
CI (CI=true) a missing browser fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from geomgen.contract import ConvertOptions
from geomgen.geometry.convert import convert_mesh
from geomgen.report import REPORT_FILE, asset_row, find_manifests, write_report
from tests.shapes import shape_glb

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's packages: chromium, chromium-driver
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# name -> (shape, subfolder, options): masses and sizes all differ, so every sort has one right order.
ASSETS = {
    "table": ("table", "", dict(material="wood", formats=["sdf", "mjcf"])),
    "mug": ("mug", "kitchen", dict(mass_kg=0.35, collision="hull")),
    "stool": ("stool", "kitchen/more", dict(mass_kg=4.0, collision="hull")),
}


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    """Three real packages in nested folders, beside things that are not packages."""
    root = tmp_path_factory.mktemp("library")
    reports = {}
    for name, (shape, sub, options) in ASSETS.items():
        reports[name] = convert_mesh(shape_glb(shape, textured=True), f"{name}.glb", root / sub, name,
                                     ConvertOptions(**options))
    (root / "notes").mkdir()
    (root / "notes" / "notes.json").write_text("{}")  # a JSON with no SDF beside it: not a package
    (root / ".hidden.partial-1234" / "x").mkdir(parents=True)  # a package still being written
    (root / ".hidden.partial-1234" / "x" / "x.json").write_text("{}")
    (root / ".hidden.partial-1234" / "x" / "x.sdf").write_text("")
    return {"root": root, "reports": reports}


def test_rows_come_from_every_package_found_recursively(library):
    root, reports = library["root"], library["reports"]
    manifests = find_manifests(root)
    assert [m.relative_to(root).as_posix() for m in manifests] == [
        "kitchen/more/stool/stool.json", "kitchen/mug/mug.json", "table/table.json"]
    rows = {row.name: row for row in (asset_row(m, root) for m in manifests)}
    for name, report in reports.items():
        row = rows[name]
        assert row.mass_kg == pytest.approx(report.mass_kg) and row.pieces == report.pieces
        assert row.size_m == pytest.approx(report.bbox_m) and row.warnings == report.warnings
        assert row.preview == f"{Path(ASSETS[name][1], name).as_posix()}/preview.png"
        assert row.checks["drake"].status == "passed"
    assert rows["table"].checks["mujoco"].status == "passed"  # it has an MJCF, loaded by MuJoCo
    assert rows["mug"].checks["mujoco"].status == "not run"


def test_a_manifest_that_cannot_be_read_is_a_row_that_says_so(tmp_path):
    package = tmp_path / "broken"
    package.mkdir()
    (package / "broken.sdf").write_text("<sdf/>")
    (package / "broken.json").write_text("{not json")
    path, count = write_report(tmp_path)
    assert count == 1
    assert "unreadable manifest broken.json" in path.read_text()


def test_the_report_command_writes_the_page(library):
    result = subprocess.run([sys.executable, "-m", "geomgen", "report", str(library["root"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = library["root"] / REPORT_FILE
    assert str(page) in result.stdout and "3 asset" in result.stdout
    html = page.read_text()
    # Offline: nothing is fetched from elsewhere.
    assert "http://" not in html and "https://" not in html and "<script src" not in html


def _browser():
    """A headless Chromium driven by selenium, or a skip (outside CI) / failure (in CI) saying what is missing."""
    missing = [what for what, ok in (
        (f"chromium ({CHROMIUM})", os.access(CHROMIUM, os.X_OK)),
        (f"chromium-driver ({CHROMEDRIVER})", os.access(CHROMEDRIVER, os.X_OK)),
        ("selenium (pip install selenium)", _importable("selenium")),
    ) if not ok]
    if missing:
        reason = f"the report's browser test needs {', '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI must install them: see .ci/run)")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1600,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_the_page_in_headless_chromium(library, tmp_path):
    root, reports = library["root"], library["reports"]
    # The page and the packages move together: open a copy elsewhere (relative links).
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    page, count = write_report(moved)
    assert count == 3
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.as_uri())
        screenshot = tmp_path / "report.png"
        assert driver.save_screenshot(str(screenshot))
        with Image.open(screenshot) as shot:
            assert shot.size[0] > 800 and len(shot.getcolors(1 << 24) or []) > 50  # a real page, not blank

        def column(css: str) -> list[str]:
            return [cell.text for cell in driver.find_elements(By.CSS_SELECTOR, f"#assets tbody td.{css}")]

        assert sorted(column("name")) == sorted(reports)
        shown_mass = dict(zip(column("name"), column("mass")))
        for name, report in reports.items():
            assert float(shown_mass[name]) == pytest.approx(report.mass_kg, rel=1e-3)
        assert dict(zip(column("name"), column("pieces"))) == {n: str(r.pieces) for n, r in reports.items()}
        assert set(column("drake")) == {"passed"}
        # Every preview loaded from the file system.
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth === 512)")
        assert loaded == [True, True, True]

        by_mass = sorted(reports, key=lambda n: reports[n].mass_kg)
        header = driver.find_element(By.XPATH, "//th/button[normalize-space()='mass kg']")
        header.click()
        assert column("name") == by_mass
        assert header.find_element(By.XPATH, "..").get_attribute("aria-sort") == "ascending"
        header.click()
        assert column("name") == by_mass[::-1]
        driver.find_element(By.XPATH, "//th/button[normalize-space()='asset']").click()
        assert column("name") == sorted(reports)
        driver.find_element(By.XPATH, "//th/button[normalize-space()='size m']").click()
        assert column("name") == sorted(reports, key=lambda n: max(reports[n].bbox_m))

        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == [], json.dumps(errors, indent=1)
    finally:
        driver.quit()


def test_generate_writes_the_report_into_its_output_folder_and_says_where(tmp_path):
    # Through the whole pipeline: an embedded broker, the mesh backend, an SDF worker;
    # the preview arrives at the client inside the package.
    out = tmp_path / "out"
    mesh = tmp_path / "stool.glb"
    mesh.write_bytes(shape_glb("stool"))
    result = subprocess.run([sys.executable, "-m", "geomgen", "generate", str(mesh), "--out", str(out),
                             "--collision", "hull", "--sdf-workers", "1", "--timeout", "120"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    page = out / REPORT_FILE
    assert f"geomgen: report of 1 asset: {page.resolve()}" in result.stderr
    assert (out / "stool" / "preview.png").stat().st_size > 1000
    assert 'src="stool/preview.png"' in page.read_text()
