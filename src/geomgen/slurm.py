"""geomgen on a Slurm cluster: the state dir, the job scripts, and the calls to
``sbatch``, ``squeue``, ``sacct`` and ``scancel`` behind ``geomgen slurm``.

A state dir on a filesystem every node reads ties the jobs together::

    STATE_DIR/
      keys/            the broker's CURVE key folder, with one peer key per role
      slurm/           the job scripts the jobs ran (copied at submit; settings.sh)
      logs/            one log per job (%x-%j.log)
      jobs.json        the job ids of the last submit, by role
      broker.address   tcp://HOST:PORT, written by the broker job once it answers
      client.env       GEOMGEN_BROKER, GEOMGEN_KEY, GEOMGEN_BROKER_KEY for clients

Only the broker binds; workers read ``broker.address`` and dial out, so the
jobs can start in any order and on any nodes.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from geomgen import keys as keyfiles
from geomgen.errors import GeomgenError, InputError

STATE_ENV = "GEOMGEN_SLURM_STATE_DIR"
DEFAULT_STATE_DIR = "geomgen-slurm"
ADDRESS_FILE = "broker.address"
CLIENT_ENV_FILE = "client.env"
JOBS_FILE = "jobs.json"
SCRIPTS_DIR = "slurm"
LOGS_DIR = "logs"
KEYS_DIR = "keys"
SCRIPTS = ("settings.sh", "broker.sbatch", "gpu-workers.sbatch", "sdf-workers.sbatch", "client.sbatch")
# The peer key each role's jobs use, made in the key folder by submit.
PEER_NAMES = {"client": "slurm-client", "gpu-worker": "slurm-gpu-worker", "sdf-worker": "slurm-sdf-worker"}
ROLES = ("broker", "gpu-workers", "sdf-workers")
# squeue states after which a job will not run again (a requeued job goes back to PENDING).
ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "TIMEOUT"})
GONE = "ENDED"  # the state of a job neither squeue nor sacct lists any more
POLL_INTERVAL_S = 1.0  # how often submit, stop and the scripts look at squeue or the state dir
COMMAND_TIMEOUT_S = 60.0  # one sbatch/squeue/scancel call, seconds
BROKER_PROBE_TIMEOUT_S = 120.0  # run-broker: how long the broker may take to answer its first health query


class SlurmError(GeomgenError):
    """A Slurm command failed or a job did not do what was expected."""

    default_code = "slurm"


# --- the state dir -------------------------------------------------------------------


def state_dir(value: str | os.PathLike | None) -> Path:
    """The state dir from ``--state-dir``, else GEOMGEN_SLURM_STATE_DIR, else ./geomgen-slurm, made absolute:
    the jobs read it from other machines and other working directories."""
    return Path(value or os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR).expanduser().resolve()


def template_dir() -> Path:
    """The job scripts shipped with geomgen (``deploy/slurm/`` in the source tree holds the same files)."""
    return Path(str(resources.files("geomgen") / "deploy_templates" / "slurm"))


def copy_scripts(dest: Path, source: Path | None = None, *, overwrite: bool = True) -> list[Path]:
    """Copy the job scripts (from ``source``, default the shipped ones) into ``dest``; returns the copies.

    Raises InputError naming a missing script; without ``overwrite`` an existing file is kept.
    """
    source = source or template_dir()
    missing = [name for name in SCRIPTS if not (source / name).is_file()]
    if missing:
        raise InputError(f"{source} lacks {', '.join(missing)}; copy the full set with `geomgen slurm scripts DIR`",
                         code="bad_scripts")
    dest.mkdir(parents=True, exist_ok=True)
    copies = []
    for name in SCRIPTS:
        target = dest / name
        if overwrite or not target.exists():
            shutil.copyfile(source / name, target)
            target.chmod(0o755 if name.endswith(".sbatch") else 0o644)
        copies.append(target)
    return copies


@dataclass(frozen=True)
class KeyPaths:
    """The files the jobs and clients read: the key folder and each role's secret key."""

    folder: Path
    broker_public: Path
    secrets: dict[str, Path]  # role -> .key_secret


def ensure_keys(folder: Path) -> tuple[KeyPaths, list[str]]:
    """The key folder with the broker's key pair and one peer key per role, made where missing.

    Returns the paths and a line per thing made. Raises InputError when a
    peer's public key is allowed but its secret is not in the folder (its
    jobs could not connect).
    """
    made = []
    if not (folder / keyfiles.BROKER_SECRET).exists():
        keyfiles.init_keys(folder)
        made.append(f"made the broker key pair in {folder}")
    else:
        keyfiles.load_broker_keys(folder)
    secrets = {}
    for role, name in PEER_NAMES.items():
        sub = folder / keyfiles.role_folder(role)
        secret = sub / (name + keyfiles.SECRET_SUFFIX)
        if not secret.exists():
            if (sub / (name + keyfiles.PUBLIC_SUFFIX)).exists():
                raise InputError(f"{sub / (name + keyfiles.PUBLIC_SUFFIX)} is allowed but its secret {secret} is "
                                 f"not there; revoke it (geomgen keys revoke {role} {name} --keys {folder}) and "
                                 "submit again", code="bad_key")
            keyfiles.add_peer(folder, role, name)
            made.append(f"made the {role} key {secret}")
        secrets[role] = secret
    return KeyPaths(folder, folder / keyfiles.BROKER_PUBLIC, secrets), made


def write_client_env(state: Path, address: str, keys: KeyPaths) -> Path:
    """``STATE_DIR/client.env``: ``source`` it, then ``geomgen generate ...`` reaches the broker."""
    lines = [f"# geomgen client settings for the Slurm jobs of {state} (geomgen slurm submit).",
             "# Use: source client.env && geomgen generate images/*.png --out assets/",
             f"export GEOMGEN_BROKER={shlex.quote(address)}",
             f"export {keyfiles.KEY_ENV}={shlex.quote(str(keys.secrets['client']))}",
             f"export {keyfiles.BROKER_KEY_ENV}={shlex.quote(str(keys.broker_public))}"]
    path = state / CLIENT_ENV_FILE
    _write_atomically(path, "\n".join(lines) + "\n")
    return path


def update_client_env(state: Path, address: str) -> bool:
    """Point an existing client.env at ``address`` (the broker job came back elsewhere); False if there is none."""
    path = state / CLIENT_ENV_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return False
    line = f"export GEOMGEN_BROKER={shlex.quote(address)}"
    lines = [line if old.startswith("export GEOMGEN_BROKER=") else old for old in lines]
    _write_atomically(path, "\n".join(lines) + "\n")
    return True


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_address(state: Path) -> str | None:
    """The broker's ``tcp://HOST:PORT`` from the state dir, or None while there is none."""
    try:
        text = (state / ADDRESS_FILE).read_text().strip()
    except OSError:
        return None
    return text.splitlines()[0] if text else None


def wait_for_address(state: Path, wait_s: float) -> str:
    """The broker's address once it is written; SlurmError after ``wait_s``."""
    deadline_s = time.monotonic() + wait_s
    while True:
        address = read_address(state)
        if address:
            return address
        if time.monotonic() >= deadline_s:
            raise SlurmError(f"no broker address in {state / ADDRESS_FILE} after {wait_s:g} s; is the broker job "
                             f"running? (geomgen slurm status --state-dir {state})", code="no_broker")
        time.sleep(POLL_INTERVAL_S)


@dataclass
class JobRecord:
    """The jobs of one submit, as ``jobs.json`` keeps them."""

    broker: str | None = None
    gpu_workers: list[str] = field(default_factory=list)
    sdf_workers: list[str] = field(default_factory=list)
    backend: str = ""

    def ids(self) -> list[str]:
        return [*self.workers(), *([self.broker] if self.broker else [])]

    def workers(self) -> list[str]:
        return [*self.gpu_workers, *self.sdf_workers]

    def role_of(self, job_id: str) -> str:
        return ("broker" if job_id == self.broker else "gpu-workers" if job_id in self.gpu_workers
                else "sdf-workers")

    def save(self, state: Path) -> None:
        _write_atomically(state / JOBS_FILE, json.dumps(
            {"broker": self.broker, "gpu-workers": self.gpu_workers, "sdf-workers": self.sdf_workers,
             "backend": self.backend}, indent=2) + "\n")

    @classmethod
    def load(cls, state: Path) -> "JobRecord":
        path = state / JOBS_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path} does not exist: nothing was submitted with --state-dir {state}",
                             code="no_jobs") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path}: {exc}", code="no_jobs") from None
        return cls(broker=data.get("broker"), gpu_workers=list(data.get("gpu-workers", [])),
                   sdf_workers=list(data.get("sdf-workers", [])), backend=data.get("backend", ""))


# --- Slurm's commands ------------------------------------------------------------------


def run_command(args: list[str], *, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a Slurm client command; SlurmError (one line) when it is missing, hangs or fails (with ``check``)."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} is not on PATH: run this where Slurm's client commands are (a login node)",
                         code="no_slurm") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{args[0]} did not answer within {COMMAND_TIMEOUT_S:g} s; is slurmctld up? (sinfo)",
                         code="slurm") from None
    if check and done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1]
        raise SlurmError(f"{args[0]} failed: {said}", code="slurm")
    return done


def sbatch(script: Path, options: list[str], env: dict[str, str]) -> str:
    """Submit ``script`` with ``sbatch --parsable``; returns the job id."""
    done = run_command(["sbatch", "--parsable", *options, str(script)], env=env)
    job_id = done.stdout.strip().splitlines()[-1].split(";")[0] if done.stdout.strip() else ""
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id for {script.name} (it said {done.stdout.strip()!r})")
    return job_id


@dataclass(frozen=True)
class JobState:
    """One job as squeue (or sacct) sees it."""

    job_id: str
    state: str  # RUNNING, PENDING, ... or GONE: ended, and neither squeue nor sacct knows it any more
    elapsed: str = ""
    where: str = ""  # node list when running, the pending reason otherwise
    source: str = "squeue"


def job_states(job_ids: list[str]) -> dict[str, JobState]:
    """The state of each job: squeue for the jobs it still lists, sacct (if accounting is on) for the rest."""
    states: dict[str, JobState] = {}
    if not job_ids:
        return states
    # --states=all: also the jobs that ended within the last MinJobAge (300 s by default).
    done = run_command(["squeue", "-h", "--states=all", "-j", ",".join(job_ids), "-o", "%i|%T|%M|%R"], check=False)
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[0] in job_ids:
            states[parts[0]] = JobState(parts[0], parts[1], parts[2], parts[3])
    rest = [job_id for job_id in job_ids if job_id not in states]
    if rest and shutil.which("sacct"):
        done = run_command(["sacct", "-n", "-P", "-X", "-j", ",".join(rest), "-o", "JobID,State,Elapsed,NodeList"],
                           check=False)
        if done.returncode == 0:
            for line in done.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) == 4 and parts[0] in rest:
                    states[parts[0]] = JobState(parts[0], parts[1].split()[0], parts[2], parts[3], "sacct")
    for job_id in job_ids:
        states.setdefault(job_id, JobState(job_id, GONE, source="-"))
    return states


def scancel(job_ids: list[str]) -> None:
    """Cancel jobs the default way: SIGTERM to every process of them, SIGKILL after the cluster's KillWait."""
    if job_ids:
        run_command(["scancel", *job_ids])


def wait_until_gone(job_ids: list[str], timeout_s: float) -> list[str]:
    """Wait until no job of ``job_ids`` is listed by squeue any more; returns those still listed at the end."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        left = [s.job_id for s in job_states(job_ids).values()
                if s.source == "squeue" and s.state not in ENDED]
        if not left or time.monotonic() >= deadline_s:
            return left
        time.sleep(POLL_INTERVAL_S)


# --- submit ----------------------------------------------------------------------------


@dataclass
class SubmitPlan:
    """What ``geomgen slurm submit`` asks of Slurm."""

    backend: str
    gpu_workers: int
    sdf_workers: int
    state: Path
    gpus_per_node: int = 1
    uses_gpu: bool = True
    partition: str | None = None
    gpu_partition: str | None = None
    gpu_worker_cpus: int | None = None
    sdf_cpus: int | None = None
    sbatch_args: tuple[str, ...] = ()
    keys_dir: Path | None = None
    scripts: Path | None = None
    timeout_s: float = 600.0

    def gpu_job_sizes(self) -> list[int]:
        """Tasks of each GPU-worker job: whole nodes of ``gpus_per_node``, the rest in the last job."""
        per_job = max(1, self.gpus_per_node)
        jobs = math.ceil(self.gpu_workers / per_job)
        return [min(per_job, self.gpu_workers - i * per_job) for i in range(jobs)]


def backend_uses_gpu(name: str) -> bool:
    """Whether the GPU-worker jobs of ``name`` need GPUs: the installed backend says; unknown here: yes."""
    from geomgen.backends import find_backend_class

    cls = find_backend_class(name)
    return True if cls is None else bool(getattr(cls, "uses_gpu", True))


def submit(plan: SubmitPlan, say: Callable[[str], None]) -> str:
    """Make keys, copy the scripts, submit broker, GPU-worker and SDF-worker jobs, wait for the broker's
    address, write client.env; returns the address. Jobs already submitted are cancelled if a later
    step fails."""
    state = plan.state
    if (state / JOBS_FILE).exists():
        previous = JobRecord.load(state)
        alive = [s.job_id for s in job_states(previous.ids()).values() if s.state not in ENDED | {GONE}]
        if alive:
            raise InputError(f"jobs {', '.join(alive)} of an earlier submit still run in {state}; stop them first "
                             f"(geomgen slurm stop --state-dir {state}) or use another --state-dir", code="busy_state")
    state.mkdir(parents=True, exist_ok=True)
    (state / LOGS_DIR).mkdir(exist_ok=True)
    keys, made = ensure_keys((plan.keys_dir or state / KEYS_DIR).resolve())
    for line in made:
        say(line)
    scripts = state / SCRIPTS_DIR
    copy_scripts(scripts, plan.scripts)
    (state / ADDRESS_FILE).unlink(missing_ok=True)
    (state / CLIENT_ENV_FILE).unlink(missing_ok=True)
    env = {**os.environ, "GEOMGEN_SLURM_DIR": str(scripts), STATE_ENV: str(state),
           "GEOMGEN_SLURM_KEYS": str(keys.folder), "GEOMGEN_SLURM_BACKEND": plan.backend,
           "GEOMGEN_SLURM_GPU_WORKER_KEY": str(keys.secrets["gpu-worker"]),
           "GEOMGEN_SLURM_SDF_WORKER_KEY": str(keys.secrets["sdf-worker"]),
           "GEOMGEN_SLURM_CLIENT_KEY": str(keys.secrets["client"])}
    common = [f"--output={state / LOGS_DIR}/%x-%j.log", "--open-mode=append", f"--chdir={state}"]
    if plan.partition:
        common.append(f"--partition={plan.partition}")
    common += list(plan.sbatch_args)
    record = JobRecord(backend=plan.backend)
    try:
        record.broker = sbatch(scripts / "broker.sbatch", common, env)
        record.save(state)
        say(f"submitted the broker: job {record.broker}")
        gpu_common = list(common)
        if plan.gpu_partition:
            gpu_common.append(f"--partition={plan.gpu_partition}")
        if plan.gpu_worker_cpus:
            gpu_common.append(f"--cpus-per-task={plan.gpu_worker_cpus}")
        for tasks in plan.gpu_job_sizes():
            options = [*gpu_common, f"--ntasks={tasks}", f"--ntasks-per-node={tasks}"]
            if plan.uses_gpu:
                options.append(f"--gres=gpu:{tasks}")
            record.gpu_workers.append(sbatch(scripts / "gpu-workers.sbatch", options, env))
            record.save(state)
        if record.gpu_workers:
            say(f"submitted {plan.gpu_workers} {plan.backend} worker(s) "
                f"{'on GPUs' if plan.uses_gpu else '(a CPU backend: no GPUs asked)'}: "
                f"job(s) {', '.join(record.gpu_workers)}")
        sdf_common = [*common, f"--cpus-per-task={plan.sdf_cpus}"] if plan.sdf_cpus else common
        for _ in range(plan.sdf_workers):
            record.sdf_workers.append(sbatch(scripts / "sdf-workers.sbatch", sdf_common, env))
            record.save(state)
        if record.sdf_workers:
            say(f"submitted {plan.sdf_workers} SDF worker(s): job(s) {', '.join(record.sdf_workers)}")
        address = wait_for_broker(state, record.broker, plan.timeout_s, say)
    except BaseException:
        if record.ids():
            say(f"cancelling the jobs submitted so far: {', '.join(record.ids())}")
            try:
                scancel(record.ids())
            except SlurmError as exc:
                say(f"could not cancel them: {exc}")
        raise
    write_client_env(state, address, keys)
    return address


def wait_for_broker(state: Path, job_id: str, timeout_s: float, say: Callable[[str], None]) -> str:
    """The address the broker job writes once it runs and answers; SlurmError if it ends or ``timeout_s`` passes."""
    deadline_s = time.monotonic() + timeout_s
    last = ""
    while True:
        job = job_states([job_id])[job_id]
        if job.state in ENDED or job.state == GONE:
            raise SlurmError(f"the broker job {job_id} ended ({job.state}) before it gave its address; see "
                             f"{log_path(state, job_id)}", code="no_broker")
        address = read_address(state)
        if job.state == "RUNNING" and address:
            return address
        news = f"{job.state} {job.where}".strip()
        if news != last:
            say(f"broker job {job_id}: {news}")
            last = news
        if time.monotonic() >= deadline_s:
            raise SlurmError(f"the broker job {job_id} gave no address within {timeout_s:g} s ({news}); it stays "
                             f"queued until cancelled: geomgen slurm stop --state-dir {state}", code="no_broker")
        time.sleep(POLL_INTERVAL_S)


def log_path(state: Path, job_id: str) -> Path:
    """The log of job ``job_id`` (any job name) in the state dir, or the pattern it would have."""
    found = sorted((state / LOGS_DIR).glob(f"*-{job_id}.log"))
    return found[0] if found else state / LOGS_DIR / f"*-{job_id}.log"


# --- stop --------------------------------------------------------------------------------


def stop(state: Path, timeout_s: float, say: Callable[[str], None]) -> list[str]:
    """Cancel the workers (SIGTERM: they finish or hand back their jobs), wait for them, then the broker.

    Returns the jobs still listed by squeue when ``timeout_s`` ran out (each wait), else [].
    """
    record = JobRecord.load(state)
    live = {s.job_id for s in job_states(record.ids()).values() if s.state not in ENDED | {GONE}}
    workers = [job_id for job_id in record.workers() if job_id in live]
    left = []
    if workers:
        scancel(workers)
        say(f"cancelled the worker jobs {', '.join(workers)} (SIGTERM); waiting for them to end")
        left += wait_until_gone(workers, timeout_s)
    if record.broker in live:
        scancel([record.broker])
        say(f"cancelled the broker job {record.broker}")
        left += wait_until_gone([record.broker], timeout_s)
    if not live:
        say("no job of this state dir was running")
    (state / ADDRESS_FILE).unlink(missing_ok=True)
    return left


# --- inside the broker job ------------------------------------------------------------------


def run_broker(state: Path, keys_dir: Path, bind: str, port: int, advertise: str | None, client_key: Path,
               broker_args: list[str], say: Callable[[str], None]) -> int:
    """Run ``geomgen broker`` as a child, write its address to the state dir once it answers a health
    query, pass SIGTERM/SIGINT on to it, and remove the address when it ends. Returns its exit code."""
    from geomgen.client import GeometryClient
    from geomgen.server import free_base_port

    if port == 0:
        port = free_base_port("127.0.0.1" if bind in ("0.0.0.0", "*") else bind)
    host = advertise or socket.gethostname()
    address = f"tcp://{host}:{port}"
    peer_keys = keyfiles.load_peer_keys(client_key, keys_dir / keyfiles.BROKER_PUBLIC)
    child = subprocess.Popen([sys.executable, "-m", "geomgen", "broker", "--host", bind, "--port", str(port),
                              "--keys", str(keys_dir), *broker_args])

    def pass_on(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    written = False
    try:
        deadline_s = time.monotonic() + BROKER_PROBE_TIMEOUT_S
        while child.poll() is None and not written:
            try:
                with GeometryClient(address, timeout_s=5.0, keys=peer_keys) as client:
                    client.health(2.0)
            except GeomgenError as exc:
                if time.monotonic() >= deadline_s:
                    say(f"the broker did not answer at {address} within {BROKER_PROBE_TIMEOUT_S:g} s ({exc}); "
                        "stopping it")
                    child.terminate()
                    break
                time.sleep(POLL_INTERVAL_S)
                continue
            _write_atomically(state / ADDRESS_FILE, address + "\n")
            written = True
            say(f"broker answering at {address}; address written to {state / ADDRESS_FILE}")
            if update_client_env(state, address):  # a requeued broker job: clients follow it too
                say(f"{state / CLIENT_ENV_FILE} points to {address}")
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.kill()
            child.wait()
        if written and read_address(state) == address:
            (state / ADDRESS_FILE).unlink(missing_ok=True)
    return code if written else (code or 1)
