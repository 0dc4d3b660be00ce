"""Admission control: the broker holds a bounded number of jobs and bytes,
refuses the rest with `busy` and a retry-after hint, and GeometryClient waits
and sends them again, so a batch larger than the limits still completes."""

from __future__ import annotations

from pathlib import Path

import pytest

from geomgen import GeometryClient, GeometryRequest
from geomgen.admission import Admission, Limits
from tests.conftest import REPO, wait_for
from tests.plugins import box_glb


def test_jobs_and_bytes_are_bounded_overall_and_per_client():
    admission = Admission(Limits(max_jobs=3, max_bytes=100, max_client_jobs=2, max_client_bytes=60))
    assert admission.refusal(b"a", 40) is None
    admission.charge("j1", b"a", 40)
    assert "per-client" in admission.refusal(b"a", 30)  # 70 bytes > 60 for client a
    assert admission.refusal(b"a", 10) is None
    admission.charge("j2", b"a", 10)
    assert "this client has 2 jobs" in admission.refusal(b"a", 1)  # job limit per client
    assert admission.refusal(b"b", 40) is None
    admission.charge("j3", b"b", 40)
    assert "the broker holds 3 jobs" in admission.refusal(b"c", 1)  # overall job limit
    admission.release("j3")
    assert "the broker holds" in admission.refusal(b"c", 60)  # 50 + 60 bytes > 100 overall
    admission.resize("j1", 5)  # its input freed, a small GLB kept
    assert admission.refusal(b"c", 60) is None
    assert admission.summary()["held_bytes"] == 15 and admission.summary()["held_jobs"] == 2


def test_an_input_larger_than_a_limit_is_admitted_alone():
    admission = Admission(Limits(max_jobs=10, max_bytes=100, max_client_jobs=10, max_client_bytes=50))
    assert admission.refusal(b"a", 80) is None  # never fits the client's share: taken when it holds nothing
    admission.charge("big", b"a", 80)
    assert admission.refusal(b"a", 1) is not None and admission.refusal(b"b", 10) is None
    admission.release("big")
    admission.release("big")  # twice is harmless
    assert admission.summary()["held_jobs"] == 0 and admission.summary()["clients"] == 0


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_client_jobs"):
        Limits(10, 10, 0, 10)


def test_a_batch_larger_than_the_limits_completes_through_busy_refusals(procs, endpoints, tmp_path):
    """120 items through a broker that holds at most 8 jobs (5 per client): the
    client is refused `busy`, waits, sends again, and every item completes once."""
    env = {"GEOMGEN_BACKENDS": "instant=tests.plugins:InstantBackend", "PYTHONPATH": str(REPO)}
    procs.start("broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port), "--max-jobs", "8",
                "--max-client-jobs", "5", env=env)
    for _ in range(2):
        procs.start("gpu-worker", "--backend", "instant", "--broker", f"127.0.0.1:{endpoints.client_port}",
                    "--backend-option", "delay_s=0.02", env=env)
    mesh = tmp_path / "box.glb"
    mesh.write_bytes(box_glb())
    requests = [GeometryRequest(image_path=mesh, output_dir=tmp_path / "out", output_filename=f"box_{i}",
                                backend="instant", want_sdf=False) for i in range(120)]
    with GeometryClient(endpoints.client, timeout_s=30, max_in_flight=120) as client:
        wait_for(lambda: client.health()["backends"].get("instant", {}).get("alive", 0) >= 2, timeout_s=60,
                 what="two instant workers")
        results = list(client.generate(requests))
        stats = client.health()
    assert sorted(index for index, _ in results) == list(range(120))
    failed = [(i, r.error_code, r.error) for i, r in results if not r.ok]
    assert not failed, failed[:3]
    assert all(Path(r.glb_path).is_file() for _, r in results)
    admission = stats["admission"]
    assert admission["refused"] > 0 and admission["held_jobs"] == 0
    assert stats["completed"] == 120 and stats["accepted"] == 120  # no item ran twice
