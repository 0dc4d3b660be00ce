"""The SDF pool's bookkeeping (geomgen.sdf_pool): per-worker credit, the
choice of worker, leases. Pure state driven by explicit timestamps."""

from __future__ import annotations

from geomgen.sdf_pool import SdfPool



def test_sdf_credit_counts_free_slots_minus_unseen_pushes():
    pool = SdfPool(lease_s=10.0)
    assert pool.credit() == 0
    pool.status("s1", slots=2, free=2, held=[], now=0.0)
    assert pool.credit() == 2
    pool.pushed("j1", 1, now=0.0, worker_id="s1")
    pool.pushed("j2", 1, now=0.0, worker_id="s1")
    assert pool.credit() == 0
    pool.status("s1", slots=2, free=1, held=[["j1", 1]], now=0.1)  # took j1; j2 still in a pipe
    assert pool.credit() == 0
    pool.status("s1", slots=2, free=0, held=[["j1", 1], ["j2", 1]], now=0.2)
    assert pool.credit() == 0
    assert pool.finished("j1", 1) is True
    pool.status("s1", slots=2, free=1, held=[["j2", 1]], now=0.3)
    assert pool.credit() == 1


def test_sdf_status_tolerates_nonsense():
    pool = SdfPool(lease_s=10.0)
    pool.status("s1", slots=-3, free=99, held=["x", [1, 2], ["j", "1"], None], now=0.0)
    assert pool.credit() == 0 and pool.workers["s1"].held == []
    pool.status("s1", slots=2, free=99, held=[], now=0.0)
    assert pool.credit() == 2  # free is capped at slots


def test_sdf_lease_renews_while_held_and_expires_when_not():
    pool = SdfPool(lease_s=1.0)
    pool.status("s1", slots=1, free=1, held=[], now=0.0)
    pool.pushed("j", 1, now=0.0, worker_id="s1")
    pool.status("s1", slots=1, free=0, held=[["j", 1]], now=0.8)
    assert pool.expired(1.5) == []  # renewed to 1.8
    assert pool.expired(1.8) == [("j", 1)]
    assert pool.finished("j", 1) is False  # a late result of an expired attempt is not current


def test_sdf_stale_attempt_does_not_renew_and_removal_expires_held_jobs():
    pool = SdfPool(lease_s=5.0)
    pool.status("s1", slots=2, free=2, held=[], now=0.0)
    pool.pushed("j", 1, now=0.0, worker_id="s1")
    pool.pushed("k", 1, now=0.0, worker_id="s1")
    pool.status("s1", slots=2, free=0, held=[["j", 1], ["k", 1]], now=0.1)
    assert pool.free == 0 and pool.slots == 2
    assert pool.remove("s1", now=1.0) is not None
    assert pool.free == 0 and pool.slots == 0
    assert sorted(pool.expired(1.0)) == [("j", 1), ("k", 1)]
    pool.status("s2", slots=1, free=1, held=[], now=1.0)
    pool.pushed("j", 2, now=1.0, worker_id="s2")
    pool.status("s2", slots=1, free=0, held=[["j", 1]], now=5.0)  # an old copy does not renew attempt 2
    assert pool.expired(6.0) == [("j", 2)]
    assert pool.silent(now=100.0, liveness=5, interval_s=0.2) == ["s2"]
    assert pool.silent(now=5.5, liveness=5, interval_s=0.2) == []


def test_a_job_goes_to_the_worker_with_the_most_credit_heard_from_recently():
    pool = SdfPool(lease_s=10.0)
    pool.status("s1", slots=2, free=2, held=[], now=0.0, heartbeat_interval_s=1.0)
    pool.status("s2", slots=4, free=3, held=[], now=0.0, heartbeat_interval_s=1.0)
    assert pool.pick(now=0.5, interval_s=1.0) == "s2"
    pool.pushed("a", 1, now=0.5, worker_id="s2")
    pool.pushed("b", 1, now=0.5, worker_id="s2")
    assert (pool.credit("s1"), pool.credit("s2"), pool.credit()) == (2, 1, 3)
    assert pool.pick(now=0.5, interval_s=1.0) == "s1"
    assert pool.pick(now=0.5, interval_s=1.0, exclude={"s1"}) == "s2"
    pool.status("s2", slots=4, free=3, held=[], now=1.5, heartbeat_interval_s=1.0)  # heard; s1 quiet since 0
    assert pool.pick(now=2.5, interval_s=1.0) == "s2"  # s1 quiet for 2.5 intervals: bypassed
    pool.pushed("c", 1, now=2.5, worker_id="s2")
    assert pool.pick(now=2.5, interval_s=1.0) is None  # s2 out of credit; s1 still quiet


def test_removing_a_worker_expires_the_jobs_it_held_and_those_sent_it_unseen():
    pool = SdfPool(lease_s=10.0)
    pool.status("s1", slots=2, free=2, held=[], now=0.0)
    pool.pushed("held", 1, now=0.0, worker_id="s1")
    pool.pushed("unseen", 1, now=0.0, worker_id="s1")
    pool.status("s1", slots=2, free=1, held=[["held", 1]], now=0.1)
    pool.remove("s1", now=1.0)
    assert sorted(pool.expired(1.0)) == [("held", 1), ("unseen", 1)]
    pool.status("s2", slots=1, free=1, held=[], now=1.0)
    assert pool.credit("s2") == 1 and pool.credit("s1") == 0
