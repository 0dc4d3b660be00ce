"""``geomgen slurm``: run the broker and workers as Slurm jobs, see them, stop them.
Thin: the state dir, the job scripts and the Slurm calls are `geomgen.slurm`'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from geomgen import slurm as slurm_jobs
from geomgen.errors import GeomgenError, InputError


def _say(line: str) -> None:
    click.echo(f"geomgen slurm: {line}", err=True)


def state_dir_option(fn):
    return click.option(
        "--state-dir", "state", metavar="DIR", envvar=slurm_jobs.STATE_ENV,
        help=f"Shared folder of this deployment (keys, job scripts, logs, the broker's address); every node must "
             f"read it [default ./{slurm_jobs.DEFAULT_STATE_DIR}; env {slurm_jobs.STATE_ENV}].")(fn)


@click.group()
def slurm() -> None:
    """Run geomgen on a Slurm cluster: a broker job, GPU-worker jobs, SDF-worker jobs.

    \b
    On a login node, with geomgen installed where the compute nodes see it:
      geomgen slurm submit --backend hunyuan3d --gpu-workers 8 --gpus-per-node 4 --sdf-workers 2
      source geomgen-slurm/client.env && geomgen generate photos/*.png --out assets/
      geomgen slurm status
      geomgen slurm stop
    The job scripts and their one settings file: `geomgen slurm scripts DIR`. See docs/deploy.md.
    """


@slurm.command()
@click.option("--backend", required=True, help="Backend of the GPU workers (hunyuan3d, sam3d, or a CPU one).")
@click.option("--gpu-workers", type=click.IntRange(min=0), required=True,
              help="GPU-worker processes in all, one per GPU (a CPU backend: one per task, no GPUs asked).")
@click.option("--sdf-workers", type=click.IntRange(min=0), required=True,
              help="SDF-worker jobs, each one task with --procs from its CPUs.")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="GPU workers per job (one node, one task per GPU); --gpu-workers / this many jobs.")
@click.option("--partition", metavar="P", help="Partition of every job.")
@click.option("--gpu-partition", metavar="P", help="Partition of the GPU-worker jobs (default: --partition).")
@click.option("--gpu-worker-cpus", type=click.IntRange(min=1), metavar="N",
              help="CPUs per GPU worker (default: gpu-workers.sbatch's, 4).")
@click.option("--sdf-cpus", type=click.IntRange(min=1), metavar="N",
              help="CPUs per SDF-worker job, its conversions at once (default: sdf-workers.sbatch's, 16).")
@state_dir_option
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Use this key folder (geomgen keys init) instead of making STATE_DIR/keys; the jobs' peer keys "
                   "(slurm-client, slurm-gpu-worker, slurm-sdf-worker) are added to it if missing.")
@click.option("--scripts", type=click.Path(file_okay=False, exists=True, path_type=Path), metavar="DIR",
              help="Job scripts you edited (from `geomgen slurm scripts DIR`) instead of the shipped ones.")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="ARG",
              help="Extra sbatch option for every job (repeatable), e.g. --sbatch-arg=--time=08:00:00 "
                   "--sbatch-arg=--account=lab.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="Seconds to wait for the broker job to run and answer.")
def submit(backend, gpu_workers, sdf_workers, gpus_per_node, partition, gpu_partition, gpu_worker_cpus, sdf_cpus,
           state, keys_dir, scripts, sbatch_args, timeout_s) -> None:
    """Submit the broker, GPU-worker and SDF-worker jobs; print the broker's tcp://HOST:PORT once it answers.

    Makes CURVE keys in STATE_DIR/keys (unless --keys) and writes STATE_DIR/client.env, so that
    `source STATE_DIR/client.env && geomgen generate ...` works on any machine that reads it.
    If the broker does not come up, the jobs submitted are cancelled.
    """
    plan = slurm_jobs.SubmitPlan(
        backend=backend, gpu_workers=gpu_workers, sdf_workers=sdf_workers, state=slurm_jobs.state_dir(state),
        gpus_per_node=gpus_per_node, uses_gpu=slurm_jobs.backend_uses_gpu(backend), partition=partition,
        gpu_partition=gpu_partition, gpu_worker_cpus=gpu_worker_cpus, sdf_cpus=sdf_cpus,
        sbatch_args=tuple(sbatch_args), keys_dir=keys_dir, scripts=scripts, timeout_s=timeout_s)
    address = slurm_jobs.submit(plan, _say)
    click.echo(address)
    _say(f"clients: source {plan.state / slurm_jobs.CLIENT_ENV_FILE} && geomgen generate IMAGES --out DIR; "
         f"see the jobs: geomgen slurm status --state-dir {plan.state}")


@slurm.command()
@state_dir_option
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds to wait for the broker's health answer.")
def status(state, timeout_s) -> None:
    """Show the jobs of the state dir (squeue, else sacct) and the broker's health.

    Exits 0 when the broker answers, 1 when it does not.
    """
    from geomgen.cli_tasks import render_health
    from geomgen.client import GeometryClient
    from geomgen.keys import load_peer_keys

    path = slurm_jobs.state_dir(state)
    record = slurm_jobs.JobRecord.load(path)
    states = slurm_jobs.job_states(record.ids())
    click.echo(f"{'ROLE':<13}{'JOB':<10}{'STATE':<12}{'TIME':<12}NODES/REASON")
    for job_id in [record.broker, *record.gpu_workers, *record.sdf_workers]:
        if job_id:
            job = states[job_id]
            click.echo(f"{record.role_of(job_id):<13}{job_id:<10}{job.state:<12}{job.elapsed or '-':<12}"
                       f"{job.where or '-'}")
    address = slurm_jobs.read_address(path)
    if not address:
        click.echo(f"\nbroker: no address in {path / slurm_jobs.ADDRESS_FILE} (not running, or still starting)")
        sys.exit(1)
    keys_dir = path / slurm_jobs.KEYS_DIR
    client_env = path / slurm_jobs.CLIENT_ENV_FILE
    try:
        keys = load_peer_keys(_client_key(client_env, keys_dir), keys_dir / "broker.key")
        with GeometryClient(address, timeout_s=timeout_s, keys=keys) as client:
            stats = client.health(timeout_s)
    except GeomgenError as exc:
        click.echo(f"\nbroker at {address}: not answering ({exc})")
        sys.exit(1)
    click.echo(f"\nbroker at {address}:\n{render_health(stats)}")


def _client_key(client_env: Path, keys_dir: Path) -> Path:
    """The client key client.env names (submit may have used --keys), else the one in STATE_DIR/keys."""
    import shlex

    try:
        for line in client_env.read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            if name == "GEOMGEN_KEY" and value:
                return Path(shlex.split(value)[0])
    except OSError:
        pass
    return keys_dir / "clients" / (slurm_jobs.PEER_NAMES["client"] + ".key_secret")


@slurm.command()
@state_dir_option
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True, help="Seconds to wait for each group of jobs to end.")
def stop(state, timeout_s) -> None:
    """Cancel the jobs cleanly: the workers first (SIGTERM: each finishes or hands back its job), then the broker."""
    path = slurm_jobs.state_dir(state)
    left = slurm_jobs.stop(path, timeout_s, _say)
    if left:
        raise slurm_jobs.SlurmError(f"jobs {', '.join(left)} are still listed after {timeout_s:g} s; Slurm kills "
                                    "them after its KillWait (squeue shows when)")
    _say("all jobs ended")


@slurm.command()
@click.argument("dest", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite scripts already in DIR.")
def scripts(dest: Path, force: bool) -> None:
    """Copy the job scripts and their settings file (settings.sh) into DIR to edit them.

    Then: geomgen slurm submit --scripts DIR ..., or sbatch them by hand from DIR.
    """
    existing = [name for name in slurm_jobs.SCRIPTS if (dest / name).exists()]
    if existing and not force:
        raise InputError(f"{dest} already has {', '.join(existing)}; --force overwrites them", code="exists")
    for path in slurm_jobs.copy_scripts(dest):
        click.echo(path)
    _say(f"edit {dest / 'settings.sh'} (and the #SBATCH lines), then: geomgen slurm submit --scripts {dest} ...")


@slurm.command("address")
@state_dir_option
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds to wait for the broker job to write its address.")
def address(state, wait_s) -> None:
    """Print the broker's tcp://HOST:PORT from the state dir (the job scripts call this)."""
    click.echo(slurm_jobs.wait_for_address(slurm_jobs.state_dir(state), wait_s))


@slurm.command("run-broker")
@state_dir_option
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The broker's key folder.")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Interface the broker binds.")
@click.option("--port", type=click.IntRange(min=0, max=65531), default=0, show_default=True,
              help="Base port (and the next three); 0 picks free ones.")
@click.option("--advertise", metavar="HOST", help="Host name written in the address (default: this host's name).")
@click.option("--client-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A client .key_secret, to check that the broker answers before writing its address.")
@click.argument("broker_args", nargs=-1, type=click.UNPROCESSED)
def run_broker(state, keys_dir, bind, port, advertise, client_key, broker_args) -> None:
    """Run the broker inside a Slurm job (broker.sbatch calls this); BROKER_ARGS go to `geomgen broker`.

    Writes tcp://HOST:PORT to STATE_DIR/broker.address once the broker answers, passes SIGTERM on to it,
    and removes the address when it ends.
    """
    path = slurm_jobs.state_dir(state)
    sys.exit(slurm_jobs.run_broker(path, keys_dir.resolve(), bind, port, advertise, client_key.resolve(),
                                   list(broker_args), _say))
