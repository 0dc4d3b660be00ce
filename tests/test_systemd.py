"""The systemd units of deploy/systemd/: ``systemd-analyze verify`` accepts each
one without a warning, and the environment file sets every variable they use.
Outside CI the check is skipped where systemd-analyze is missing; in CI
(``CI`` set, as .ci/run does) that is a failure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

UNITS = REPO / "deploy" / "systemd"
ENV_FILE = UNITS / "geomgen.env"
REQUIRED = bool(os.environ.get("CI") or os.environ.get("GEOMGEN_REQUIRE_DEPLOY_TOOLS"))


def _units() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        message = "systemd-analyze is not installed: bash .ci/install-slurm.sh (Debian's systemd package)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return tool


def test_the_units_are_there():
    assert {p.name for p in _units()} == {"geomgen-broker.service", "geomgen-gpu-worker@.service",
                                          "geomgen-sdf-worker.service"}


@pytest.mark.parametrize("unit", _units(), ids=lambda p: p.name)
def test_systemd_analyze_verify_accepts_the_unit(unit, tmp_path):
    tool = _analyze()
    # A template is verified through an instance, as `systemctl start geomgen-gpu-worker@0` makes one.
    name = unit.name.replace("@.", "@0.")
    shutil.copyfile(unit, tmp_path / name)
    done = subprocess.run([tool, "verify", "--man=no", str(tmp_path / name)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    said = (done.stdout + done.stderr).strip()
    # verify exits 0 on settings it ignores ("Unknown key", "Failed to parse"): any line it prints is a fault.
    assert done.returncode == 0 and said == "", said


def _env_settings() -> dict[str, str]:
    settings = {}
    for number, line in enumerate(ENV_FILE.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line)
        assert match, f"{ENV_FILE.name}:{number} is not KEY=value: {line!r}"
        settings[match.group(1)] = match.group(2)
    return settings


@pytest.mark.parametrize("unit", _units(), ids=lambda p: p.name)
def test_the_environment_file_sets_what_the_unit_uses(unit):
    text = unit.read_text()
    assert "EnvironmentFile=/etc/geomgen/geomgen.env" in text
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", text)) - {"MAINPID"}
    assert used, unit.name
    assert used <= set(_env_settings()), sorted(used - set(_env_settings()))


def test_a_gpu_worker_instance_takes_its_gpu_from_the_instance_name():
    exec_start = next(line for line in (UNITS / "geomgen-gpu-worker@.service").read_text().splitlines()
                      if line.startswith("ExecStart="))
    assert "--gpu %i" in exec_start and "--worker-id %H-gpu%i" in exec_start
