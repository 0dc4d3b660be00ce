"""geomgen on Slurm.

Without Slurm: the job scripts (shipped, and their copies in deploy/slurm/),
the state dir's keys and client.env, how GPU workers are split into jobs.

With a real one-node Slurm cluster (marker ``slurm``; .ci/run installs
slurm-wlm and munge first): munged, slurmctld and slurmd started by a
fixture with a configuration of their own in a temporary folder, every
connection on loopback; ``geomgen slurm submit`` runs a CPU backend in the
GPU-worker jobs, a batch goes through ``geomgen generate`` with the settings of
``client.env``, one GPU-worker job is cancelled with scancel mid-batch, and
every item still completes; ``status``; the other requeues itself on the USR1
Slurm sends before a time limit and its worker comes back; the broker job is
requeued, the workers and client.env follow its new address; then ``stop``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from geomgen import slurm
from geomgen.client import GeometryClient
from geomgen.keys import load_peer_keys
from tests.conftest import REPO, free_base_port, wait_for

SAMPLES = REPO / "src" / "geomgen" / "samples"
DEPLOY = REPO / "deploy" / "slurm"
REQUIRED = bool(os.environ.get("CI") or os.environ.get("GEOMGEN_REQUIRE_DEPLOY_TOOLS"))


# --- without Slurm --------------------------------------------------------------------


def test_deploy_folder_holds_the_shipped_scripts():
    """deploy/slurm/ (what people read and copy) is exactly what submit ships."""
    for name in slurm.SCRIPTS:
        assert (DEPLOY / name).read_bytes() == (slurm.template_dir() / name).read_bytes(), name


@pytest.mark.parametrize("name", [n for n in slurm.SCRIPTS])
def test_job_scripts_are_valid_bash_that_read_the_settings(name):
    script = slurm.template_dir() / name
    subprocess.run(["bash", "-n", str(script)], check=True)
    if name.endswith(".sbatch"):
        text = script.read_text()
        assert text.startswith("#!/bin/bash\n")
        assert 'source "${GEOMGEN_SLURM_DIR:-$SLURM_SUBMIT_DIR}/settings.sh"' in text


def test_settings_take_the_environment_over_their_defaults(tmp_path):
    settings = slurm.template_dir() / "settings.sh"
    show = f'source {settings}; echo "$GEOMGEN_SLURM_BACKEND|$GEOMGEN_SLURM_KEYS|$GEOMGEN_SLURM_PORT"'
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    default = subprocess.run(["bash", "-c", show], env=env, capture_output=True, text=True, check=True).stdout
    assert default.strip() == f"hunyuan3d|{tmp_path}/geomgen-slurm/keys|0"
    env.update(GEOMGEN_SLURM_BACKEND="silhouette", GEOMGEN_SLURM_STATE_DIR="/shared/x", GEOMGEN_SLURM_PORT="6000")
    given = subprocess.run(["bash", "-c", show], env=env, capture_output=True, text=True, check=True).stdout
    assert given.strip() == "silhouette|/shared/x/keys|6000"


@pytest.mark.parametrize("workers, per_node, sizes", [(8, 4, [4, 4]), (5, 4, [4, 1]), (2, 1, [1, 1]), (0, 4, [])])
def test_gpu_workers_are_split_into_one_job_per_node(workers, per_node, sizes, tmp_path):
    plan = slurm.SubmitPlan(backend="hunyuan3d", gpu_workers=workers, sdf_workers=0, state=tmp_path,
                            gpus_per_node=per_node)
    assert plan.gpu_job_sizes() == sizes


def test_keys_are_made_once_and_client_env_names_them(tmp_path):
    keys, made = slurm.ensure_keys(tmp_path / "keys")
    assert len(made) == 4  # the broker's pair and one peer per role
    again, made_again = slurm.ensure_keys(tmp_path / "keys")
    assert made_again == [] and again == keys
    for role in slurm.PEER_NAMES:
        load_peer_keys(keys.secrets[role], keys.broker_public)  # each is a usable peer key pair
    env_file = slurm.write_client_env(tmp_path, "tcp://node7:20000", keys)
    shown = subprocess.run(["bash", "-c", f"source {env_file}; echo $GEOMGEN_BROKER $GEOMGEN_KEY $GEOMGEN_BROKER_KEY"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert shown == ["tcp://node7:20000", str(keys.secrets["client"]), str(keys.broker_public)]


def test_a_peer_key_without_its_secret_is_refused_with_the_fix(tmp_path):
    keys, _ = slurm.ensure_keys(tmp_path / "keys")
    keys.secrets["gpu-worker"].unlink()
    with pytest.raises(slurm.InputError, match="geomgen keys revoke gpu-worker slurm-gpu-worker"):
        slurm.ensure_keys(tmp_path / "keys")


def test_commands_say_what_to_do_without_slurm(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no sbatch, squeue, ... here
    done = subprocess.run([sys.executable, "-m", "geomgen", "slurm", "submit", "--backend", "mesh", "--gpu-workers",
                           "1", "--sdf-workers", "0", "--state-dir", str(tmp_path / "state")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "geomgen: error: sbatch is not on PATH: run this where Slurm's client commands are (a login node)")
    assert not (tmp_path / "state" / "jobs.json").exists()


def test_status_stop_and_address_say_what_is_missing(tmp_path):
    def geomgen(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "geomgen", "slurm", *args, "--state-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)

    for command in ("status", "stop"):
        done = geomgen(command)
        assert done.returncode == 2
        assert done.stderr.strip() == (f"geomgen: error: {tmp_path}/jobs.json does not exist: nothing was submitted "
                                       f"with --state-dir {tmp_path}")
    done = geomgen("address", "--wait", "0")
    assert done.returncode == 2 and "no broker address in" in done.stderr and "geomgen slurm status" in done.stderr
    (tmp_path / "broker.address").write_text("tcp://node3:20000\n")
    done = geomgen("address")
    assert done.returncode == 0 and done.stdout == "tcp://node3:20000\n"


# --- a live one-node cluster ------------------------------------------------------------------


SLURM_CONF = """\
ClusterName=geomgentest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again this long (+1 s) after it was stopped (default 120 s).
AuthInfo=socket={root}/munge.sock,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# The jobs ask for more CPUs than this machine has; Slurm only counts them.
SlurmdParameters=config_overrides
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


class Cluster:
    """A one-node Slurm cluster on this machine, for the length of a test module."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []

    def start(self) -> None:
        root = self.root
        (root / "state").mkdir()
        (root / "spool").mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._daemon("munged", ["munged", "--foreground", "--force", f"--socket={root}/munge.sock",
                                f"--key-file={key}", f"--pid-file={root}/munged.pid",
                                f"--seed-file={root}/munged.seed", f"--log-file={root}/munged.log"])
        wait_for(lambda: (root / "munge.sock").exists(), timeout_s=30, what="munged's socket")
        ports = free_base_port(2)
        self.conf.write_text(SLURM_CONF.format(host=socket.gethostname(), root=root, ctld_port=ports,
                                               slurmd_port=ports + 1, cpus=16))
        self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._daemon("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        wait_for(lambda: self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle", timeout_s=60,
                 interval_s=0.5, what=f"sinfo to show the node idle (logs in {root})")

    def _daemon(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self.daemons.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
        time.sleep(0.2)
        if self.daemons[-1].poll() is not None:
            raise AssertionError(f"{name} exited at once: {(self.root / f'{name}.out').read_text()[-2000:]}")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def jobs(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()

    def stop(self) -> None:
        if self.daemons[1:] and self.jobs():
            self.run("scancel", "--full", *self.jobs(), check=False)
            deadline_s = time.monotonic() + 60
            while self.jobs() and time.monotonic() < deadline_s:
                time.sleep(0.5)
        for proc in reversed(self.daemons):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cluster():
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not installed: bash .ci/install-slurm.sh (as root)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    if os.geteuid() != 0:
        (pytest.fail if REQUIRED else pytest.skip)("the Slurm daemons of this test run as root")
    # A short path: munged's socket path must fit in a sockaddr_un.
    root = Path(tempfile.mkdtemp(prefix="geomgen-slurm-"))
    root.chmod(0o755)  # slurmd and munged check the folders they use
    made = Cluster(root)
    try:
        made.start()
        yield made
    finally:
        made.stop()
        shutil.rmtree(root, ignore_errors=True)


def _images(folder: Path, count: int) -> list[Path]:
    """``count`` images made from the bundled samples, a few pixels random, so that none is the same as
    another or as any of an earlier run (a result cache would answer it without a worker)."""
    from PIL import Image

    folder.mkdir()
    sources = sorted(SAMPLES.glob("*.png"))
    paths = []
    for i in range(count):
        image = Image.open(sources[i % len(sources)]).convert("RGBA")
        for x, value in enumerate(os.urandom(16)):
            image.putpixel((x, 0), (value, i, 7, 0))
        path = folder / f"item{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def _job_of(pid: int) -> str:
    """The Slurm job a process of this machine runs in (SLURM_JOB_ID in its environment)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(item.split(b"=", 1)[1].decode() for item in environ if item.startswith(b"SLURM_JOB_ID="))


def _geomgen(cluster: Cluster, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geomgen", *args], env=cluster.env, capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_submit_generate_scancel_a_worker_status_stop(cluster, tmp_path):
    state = tmp_path / "state"
    cluster.env.update(GEOMGEN_SLURM_CMD=f"{sys.executable} -m geomgen", GEOMGEN_SLURM_BIND="127.0.0.1",
                       PYTHONUNBUFFERED="1")
    # Extra sbatch options from the configuration file; the flags name the rest.
    site = tmp_path / "site.toml"
    site.write_text('[slurm.submit]\nsbatch_arg = ["--time=30", "--comment=geomgen-test"]\n')
    # The GPU-worker jobs run a CPU backend here: no GPUs are asked for.
    submitted = _geomgen(cluster, "--config", str(site), "slurm", "submit", "--backend", "silhouette",
                         "--gpu-workers", "2", "--sdf-workers", "1", "--gpu-worker-cpus", "1", "--sdf-cpus", "2",
                         "--state-dir", str(state), "--timeout", "180")
    assert submitted.returncode == 0, submitted.stderr
    address = submitted.stdout.strip()
    assert address.startswith(f"tcp://{socket.gethostname()}:")
    assert (state / "broker.address").read_text().strip() == address
    record = slurm.JobRecord.load(state)
    assert record.broker and len(record.gpu_workers) == 2 and len(record.sdf_workers) == 1
    client_env = (state / "client.env").read_text()
    assert f"export GEOMGEN_BROKER={address}\n" in client_env
    for job in record.ids():  # what the file asked for reached every job
        assert cluster.run("squeue", "-h", "-j", job, "-o", "%l|%k").stdout.strip() == "30:00|geomgen-test"

    keys = load_peer_keys(state / "keys/clients/slurm-client.key_secret", state / "keys/broker.key")

    def health() -> dict:
        with GeometryClient(address, timeout_s=10, keys=keys) as client:
            return client.health(10)

    wait_for(lambda: (lambda s: s["backends"].get("silhouette", {}).get("alive", 0) == 2
                      and len(s["sdf_workers"]) == 1)(health()),
             timeout_s=240, interval_s=1, what=f"2 silhouette workers and an SDF worker (logs in {state / 'logs'})")
    # A client's health report names no worker ids; the workers' processes say which job they run in.
    assert sorted(_job_of(w["pid"]) for w in health()["workers"]) == sorted(record.gpu_workers)

    images = _images(tmp_path / "images", 8)
    out = tmp_path / "assets"
    # As a user would: the broker and the keys from client.env (GEOMGEN_BROKER, GEOMGEN_KEY, GEOMGEN_BROKER_KEY).
    command = (f"source {state / 'client.env'} && exec {sys.executable} -m geomgen generate "
               + " ".join(str(p) for p in images)
               + f" --out {out} --height 0.3 --collision hull --json --timeout 120")
    batch = subprocess.Popen(["bash", "-c", command], env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        busy = wait_for(lambda: [w["pid"] for w in health()["workers"] if w.get("busy")], timeout_s=120,
                        interval_s=0.2, what="a busy worker")
        victim = _job_of(busy[0])
        assert victim in record.gpu_workers
        cluster.run("scancel", victim)
        stdout, stderr = batch.communicate(timeout=600)
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.communicate()
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert batch.returncode == 0, stderr[-3000:]
    assert sorted(row["index"] for row in rows) == list(range(8))
    assert all(row["status"] == "ok" for row in rows), rows
    for image in images:
        assert (out / image.stem / f"{image.stem}.sdf").is_file()

    # The cancelled job is gone, its worker left the broker; the other worker did the rest.
    wait_for(lambda: victim not in cluster.jobs(), timeout_s=120, interval_s=0.5, what=f"job {victim} to end")
    stats = health()
    assert [_job_of(w["pid"]) for w in stats["workers"]] == [j for j in record.gpu_workers if j != victim]
    assert stats["completed"] == 8 and stats["failed"] == 0
    victim_log = next((state / "logs").glob(f"*-{victim}.log")).read_text()
    # It got Slurm's SIGTERM with a job in hand, and finished it or handed it back (the rows above are all ok).
    assert "received SIGTERM; stopping" in victim_log and "stopping: waiting up to" in victim_log, victim_log[-3000:]

    shown = _geomgen(cluster, "slurm", "status", "--state-dir", str(state))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any(line.split()[:3] == ["broker", record.broker, "RUNNING"] for line in lines), shown.stdout
    survivor = next(j for j in record.gpu_workers if j != victim)
    assert any(line.split()[:3] == ["gpu-workers", survivor, "RUNNING"] for line in lines), shown.stdout
    assert any(line.split()[:3] == ["gpu-workers", victim, "CANCELLED"] for line in lines), shown.stdout
    assert f"broker at {address}:" in shown.stdout and "silhouette" in shown.stdout

    # Near its time limit Slurm sends the batch shell USR1 (--signal=B:USR1@120): the job requeues itself,
    # and its worker comes back under the same job id.
    before = [w["pid"] for w in health()["workers"]]
    cluster.run("scancel", "--signal=USR1", "--batch", survivor)
    wait_for(lambda: (lambda ws: len(ws) == 1 and ws[0]["pid"] not in before and _job_of(ws[0]["pid"]) == survivor)(
        health()["workers"]), timeout_s=300, interval_s=1, what=f"job {survivor} to requeue and its worker to return")
    survivor_log = next((state / "logs").glob(f"*-{survivor}.log")).read_text()
    assert f"time limit near: requeueing job {survivor}" in survivor_log, survivor_log[-3000:]

    # The broker job requeued (a node failure, preemption): it comes back on new ports, rewrites its address
    # and client.env, and the worker jobs restart their workers towards it; a new batch goes through.
    broker_log = next((state / "logs").glob(f"*-{record.broker}.log"))
    cluster.run("scontrol", "requeue", record.broker)
    wait_for(lambda: broker_log.read_text().count("address written to") == 2, timeout_s=300, interval_s=1,
             what=f"the requeued broker job to write its address again ({broker_log})")
    address = slurm.read_address(state)
    assert f"export GEOMGEN_BROKER={address}\n" in (state / "client.env").read_text()
    wait_for(lambda: (lambda s: s["backends"].get("silhouette", {}).get("alive", 0) == 1
                      and len(s["sdf_workers"]) == 1)(health()),
             timeout_s=240, interval_s=1, what="the workers at the requeued broker")
    more = _images(tmp_path / "more", 2)
    again = subprocess.run(["bash", "-c", f"source {state / 'client.env'} && exec {sys.executable} -m geomgen generate "
                            + " ".join(str(p) for p in more) + f" --out {out} --height 0.3 --collision hull --json"],
                           env=cluster.env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [json.loads(line)["status"] for line in again.stdout.splitlines() if line.startswith("{")] == ["ok", "ok"]

    stopped = _geomgen(cluster, "slurm", "stop", "--state-dir", str(state))
    assert stopped.returncode == 0, stopped.stderr
    assert "all jobs ended" in stopped.stderr
    assert not set(record.ids()) & set(cluster.jobs())
    assert not (state / "broker.address").exists()
    after = _geomgen(cluster, "slurm", "status", "--state-dir", str(state))
    assert after.returncode == 1 and "no address" in after.stdout
