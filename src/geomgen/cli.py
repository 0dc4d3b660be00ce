"""The ``geomgen`` command line: thin click commands over the roles and the client.

Process roles (broker, gpu-worker, sdf-worker, serve), the client (generate,
health, demo), local conversion (convert) and the environment check (doctor).
Errors print one line on stderr and exit non-zero, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from geomgen import __version__, config, contract, defaults, logs
from geomgen.admission import Limits
from geomgen.endpoints import Endpoints, parse_broker
from geomgen.errors import GeomgenError, InputError

EXIT_FAILED_ITEMS = 1  # some inputs failed
EXIT_ERROR = 2  # the command itself could not run
DEFAULT_BROKER = f"{defaults.HOST}:{defaults.CLIENT_PORT}"


class _Group(click.Group):
    """Turns geomgen errors into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GeomgenError as exc:
            if logs.json_active():  # a log shipper reads stderr: keep every line JSON
                logging.getLogger("geomgen").error("%s", exc)
            else:
                click.echo(f"geomgen: error: {exc}", err=True)
            ctx.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("geomgen: interrupted", err=True)
            ctx.exit(130)


# --- shared options --------------------------------------------------------------


def _broker_endpoints(_ctx: click.Context, _param: click.Parameter, value: str) -> Endpoints:
    try:
        return parse_broker(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


def _key_values(_ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param=param)
        options[key.strip()] = value
    return options


def _cache_size(_ctx: click.Context, param: click.Parameter, value: Any) -> int:
    from geomgen.cache import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def cache_options(fn):
    """--cache-dir, --cache-size and --no-cache: the broker's result cache (cache.py)."""
    fn = click.option("--no-cache", is_flag=True,
                      help="Compute every result afresh and store none (no result cache).")(fn)
    fn = click.option("--cache-size", default="10G", show_default=True, callback=_cache_size, metavar="SIZE",
                      help="Disk the result cache may use (bytes, or with K, M, G, T); least recently used "
                           "results go first.")(fn)
    return click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                        help="Folder of the result cache, shared across restarts (default: $GEOMGEN_CACHE_DIR, "
                             "else ~/.cache/geomgen/results or $XDG_CACHE_HOME/geomgen/results).")(fn)


def cache_settings(cache_dir: Path | None, cache_size: int | None, no_cache: bool) -> dict[str, Any]:
    """GeometryServer's broker settings for these cache options (only those given)."""
    settings: dict[str, Any] = {"no_cache": True} if no_cache else {}
    if cache_dir is not None:
        settings["cache_dir"] = str(cache_dir)
    if cache_size is not None:
        settings["cache_size"] = cache_size
    return settings


def open_cache_or_exit(cache_dir: Path | None, cache_size: int, no_cache: bool):
    """The broker's result cache (None with --no-cache); a folder it cannot use stops the command."""
    from geomgen.cache import open_cache

    try:
        return open_cache(cache_dir, cache_size, enabled=not no_cache)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


def broker_option(fn):
    return click.option(
        "--broker", "endpoints", default=DEFAULT_BROKER, show_default=True, callback=_broker_endpoints,
        help="Broker address: HOST, HOST:PORT or tcp://HOST:PORT; PORT is its client (base) port.",
    )(fn)


def backend_options_option(fn):
    return click.option(
        "--backend-option", "backend_options", multiple=True, metavar="KEY=VALUE", callback=_key_values,
        help="Backend option (repeatable), e.g. --backend-option height_m=0.5.",
    )(fn)


def peer_keys_option(fn):
    """--key / --broker-key: a peer's CURVE keys for a broker started with --keys."""
    fn = click.option("--broker-key", envvar="GEOMGEN_BROKER_KEY", metavar="FILE",
                      help="The broker's public key (broker.key) [env GEOMGEN_BROKER_KEY].")(fn)
    return click.option("--key", envvar="GEOMGEN_KEY", metavar="FILE",
                        help="This peer's secret key file (NAME.key_secret from `geomgen keys add`) "
                             "[env GEOMGEN_KEY].")(fn)


def peer_keys(key: str | None, broker_key: str | None):
    """The PeerKeys the flags name, or None; InputError (one line, exit 2) if only one is given or a file is bad."""
    from geomgen.keys import peer_keys_from_env

    return peer_keys_from_env(key, broker_key)


def verbose_option(fn):
    """-v/-vv, --log-level and --log-format (logs.py): how a process logs on stderr."""
    fn = logs.log_options(fn)
    return click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")(fn)


def _logging(verbose: int) -> None:
    logs.setup_from_context(verbose)


def convert_options(fn):
    """Conversion flags shared by `generate` and `convert` (ConvertOptions fields)."""
    options = [
        click.option("--mass-kg", type=float, help="Mass of the object in kg. Excludes --density; with "
                                                   "--material, the material sets the friction."),
        click.option("--density", "density_kg_m3", type=float,
                     help=f"Density in kg/m^3, times the volume gives the mass (default "
                          f"{defaults.DENSITY_KG_M3:g} when no mass, density or material is given)."),
        click.option("--material", help="Material name (wood, metal, plastic, fabric, ceramic, glass, rubber, "
                                         "paper, stone, foam, leather...): density and friction."),
        click.option("--mu", type=float, help="Coulomb friction coefficient (default: the material's, else 0.5)."),
        click.option("--collision", type=click.Choice(["coacd", "vhacd", "hull"]), default="coacd",
                     show_default=True, help="Collision geometry: convex decomposition or one convex hull."),
        click.option("--collision-param", "collision_params", multiple=True, metavar="KEY=VALUE",
                     callback=_key_values, help="Decomposition parameter (repeatable), e.g. threshold=0.05."),
        click.option("--dimensions", type=float, nargs=3, metavar="X Y Z",
                     help="Target bounding box in metres, Drake frame (+Z up); scaled uniformly to fit."),
        click.option("--scale", type=float, help="Uniform scale factor (when --dimensions is not given)."),
        click.option("--hydroelastic", is_flag=True, help="Also write compliant-hydroelastic contact properties."),
        click.option("--no-preview", is_flag=True,
                     help="Do not render preview.png (visual beside collision; about 0.4 s an asset)."),
        click.option("--format", "formats", multiple=True, type=click.Choice(["sdf", "mjcf", "urdf", "usd"]),
                     help="Simulator format to write beside the SDF (repeatable): mjcf (MuJoCo), urdf, usd "
                          "(Isaac; needs the usd extra). The SDF is always written."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def convert_fields(params: dict[str, Any]) -> dict[str, Any]:
    """The ConvertOptions fields given on the command line (unset ones left out),
    checked by the request contract: a bad flag stops the command before any work."""
    fields = {name: params[name] for name in ("mass_kg", "density_kg_m3", "material", "mu", "scale")
              if params.get(name) is not None}
    if params.get("dimensions"):
        fields["dimensions"] = list(params["dimensions"])
    fields["collision"] = params["collision"]
    fields["collision_params"] = {k: _number_or_text(v) for k, v in params["collision_params"].items()}
    fields["hydroelastic"] = bool(params.get("hydroelastic"))
    fields["formats"] = ["sdf", *params.get("formats", ())]
    if params.get("no_preview"):
        fields["preview"] = False
    try:
        contract.convert_options(fields)
    except InputError as exc:
        raise click.UsageError(exc.message) from None
    return fields


def _number_or_text(value: str) -> Any:
    try:
        return json.loads(value)  # 0.05 -> float, 20 -> int, true -> bool
    except ValueError:
        return value


# --- the group -----------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="geomgen")
@config.config_option
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None) -> None:
    """geomgen: pictures of objects in, simulation-ready Drake SDFormat assets out.

    \b
    Quick start (one machine, CPU backends):
      geomgen demo                                 # the whole pipeline on bundled samples
      geomgen generate chair.png mug.obj --out assets/
    Several machines (keys: docs/security.md):
      geomgen keys init keys/; geomgen keys add gpu-worker gpu1 --keys keys/ ...
      geomgen broker --host 0.0.0.0 --keys keys/
      geomgen gpu-worker --backend hunyuan3d --gpu 0 --broker HUB --key gpu1.key_secret --broker-key broker.key
      geomgen sdf-worker --procs 8 --broker HUB --key cpu1.key_secret --broker-key broker.key
      geomgen generate photos/*.png --out assets/ --broker HUB --key me.key_secret --broker-key broker.key
    Settings also come from the environment (GEOMGEN_BROKER=HUB, GEOMGEN_<COMMAND>_<OPTION>) and
    from --config FILE; `geomgen config show COMMAND` prints each one and where it came from.
    """
    config.apply(ctx, config_file)


def main() -> None:
    """Entry point of the ``geomgen`` script."""
    cli(prog_name="geomgen")


# --- process roles -----------------------------------------------------------------


@cli.command()
@click.option("--host", default=defaults.HOST, show_default=True,
              help="Interface to bind; 0.0.0.0 accepts workers and clients from other machines.")
@click.option("--port", type=int, default=defaults.CLIENT_PORT, show_default=True,
              help="Base port: clients on it, GPU workers, SDF jobs and SDF results on the next three.")
@click.option("--client-port", type=int, help="Client ROUTER port (default: --port).")
@click.option("--worker-port", type=int, help="GPU-worker ROUTER port (default: --port + 1).")
@click.option("--sdf-job-port", type=int, help="SDF job PUSH port (default: --port + 2).")
@click.option("--sdf-result-port", type=int, help="SDF result PULL port (default: --port + 3).")
@click.option("--heartbeat-interval", type=float, default=defaults.HEARTBEAT_INTERVAL_S, show_default=True,
              help="Seconds between heartbeats to workers and clients.")
@click.option("--liveness", type=int, default=defaults.HEARTBEAT_LIVENESS, show_default=True,
              help="Missed heartbeat intervals before a worker is declared dead.")
@click.option("--max-retries", type=int, default=defaults.MAX_RETRIES, show_default=True,
              help="Re-runs of a job whose worker was lost, before it fails with worker_lost.")
@click.option("--no-worker-timeout", type=float, default=defaults.NO_WORKER_TIMEOUT_S, show_default=True,
              help="Seconds a request waits for a live worker of its backend before failing with no_worker.")
@click.option("--sdf-lease", type=float, default=defaults.SDF_LEASE_S, show_default=True,
              help="Seconds an SDF job may go unreported by any SDF worker before it is pushed again.")
@click.option("--max-jobs", type=click.IntRange(min=1), default=defaults.MAX_HELD_JOBS, show_default=True,
              help="Jobs the broker holds at most (queued, running, converting); more are refused 'busy'.")
@click.option("--max-bytes", type=click.IntRange(min=1), default=defaults.MAX_HELD_BYTES, show_default=True,
              help="Input and GLB bytes the broker holds at most.")
@click.option("--max-client-jobs", type=click.IntRange(min=1), default=defaults.MAX_CLIENT_JOBS, show_default=True,
              help="Jobs one client may have at the broker.")
@click.option("--max-client-bytes", type=click.IntRange(min=1), default=defaults.MAX_CLIENT_BYTES,
              show_default=True, help="Input and GLB bytes one client may have at the broker.")
@click.option("--client-liveness", type=click.FloatRange(min=0, min_open=True), default=defaults.CLIENT_LIVENESS_S,
              show_default=True, help="Seconds a client holding jobs may be silent before its jobs are dropped.")
@click.option("--client-send-hwm", type=click.IntRange(min=1), default=defaults.CLIENT_SEND_HWM, show_default=True,
              help="Messages queued for a client that does not read before more are dropped.")
@click.option("--keys", "keys_dir", envvar="GEOMGEN_KEYS", type=click.Path(file_okay=False, path_type=Path),
              help="Key folder from `geomgen keys init`: CURVE on every port, peers allowed by role "
                   "[env GEOMGEN_KEYS]. Required off loopback unless --insecure.")
@click.option("--insecure", is_flag=True,
              help="Listen off loopback without keys: anyone who reaches the ports can read and forge assets.")
@cache_options
@verbose_option
def broker(host, port, client_port, worker_port, sdf_job_port, sdf_result_port, heartbeat_interval, liveness,
           max_retries, no_worker_timeout, sdf_lease, max_jobs, max_bytes, max_client_jobs, max_client_bytes,
           client_liveness, client_send_hwm, keys_dir, insecure, cache_dir, cache_size, no_cache, verbose) -> None:
    """Run the broker: the only process that binds (four ports from --port).

    \b
    Examples:
      geomgen broker                                    # loopback only, no keys needed
      geomgen keys init keys/ && geomgen broker --host 0.0.0.0 --keys keys/
    """
    from geomgen import broker as broker_role
    from geomgen.keys import load_broker_keys

    keys = load_broker_keys(keys_dir) if keys_dir is not None else None

    base = Endpoints.from_base(host, port)
    overrides = {"client_port": client_port, "worker_port": worker_port, "sdf_job_port": sdf_job_port,
                 "sdf_result_port": sdf_result_port}
    endpoints = Endpoints(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    _logging(verbose)
    cache = open_cache_or_exit(cache_dir, cache_size, no_cache)
    sys.exit(broker_role.serve(endpoints, heartbeat_interval_s=heartbeat_interval, heartbeat_liveness=liveness,
                               max_retries=max_retries, no_worker_timeout_s=no_worker_timeout,
                               sdf_lease_s=sdf_lease,
                               limits=Limits(max_jobs, max_bytes, max_client_jobs, max_client_bytes),
                               client_liveness_s=client_liveness, client_send_hwm=client_send_hwm,
                               keys=keys, insecure=insecure, cache=cache))


@cli.command("gpu-worker")
@click.option("--backend", required=True, help="Backend to serve: hunyuan3d, sam3d, silhouette, mesh or a plug-in.")
@click.option("--gpu", help="GPU id; sets CUDA_VISIBLE_DEVICES before anything imports torch.")
@broker_option
@click.option("--worker-port", type=int, help="The broker's GPU-worker port, if not the client port + 1.")
@backend_options_option
@click.option("--heartbeat-interval", type=float, default=defaults.HEARTBEAT_INTERVAL_S, show_default=True,
              help="Seconds between heartbeats to the broker.")
@click.option("--liveness", type=int, default=defaults.HEARTBEAT_LIVENESS, show_default=True,
              help="Missed broker heartbeats before reconnecting.")
@click.option("--worker-id", help="Name in the broker's health report (default: a random id).")
@click.option("--generate-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Seconds one job may run before the backend process is killed and reloaded (default: the "
                   "backend's own, 300 for CPU backends, 1800 for GPU ones); a request's deadline may ask for less.")
@peer_keys_option
@verbose_option
def gpu_worker(backend, gpu, endpoints, worker_port, backend_options, heartbeat_interval, liveness, worker_id,
               generate_timeout, key, broker_key, verbose) -> None:
    """Run one GPU worker: loads its backend once, then one job at a time.

    Example: geomgen gpu-worker --backend hunyuan3d --gpu 0 --broker hub:5555
    """
    from geomgen import gpu_worker as worker_role

    if worker_port is not None:
        endpoints = Endpoints(**{**endpoints.__dict__, "worker_port": worker_port})
    _logging(verbose)
    sys.exit(worker_role.main(backend, endpoints, gpu=gpu, backend_options=backend_options,
                              generate_timeout_s=generate_timeout, heartbeat_interval_s=heartbeat_interval,
                              heartbeat_liveness=liveness, worker_id=worker_id, keys=peer_keys(key, broker_key)))


@cli.command("sdf-worker")
@broker_option
@click.option("--sdf-job-port", type=int, help="The broker's SDF job port, if not the client port + 2.")
@click.option("--sdf-result-port", type=int, help="The broker's SDF result port, if not the client port + 3.")
@click.option("--procs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Conversions run at once, each in its own child process.")
@click.option("--heartbeat-interval", type=float, default=defaults.HEARTBEAT_INTERVAL_S, show_default=True,
              help="Seconds between status heartbeats to the broker.")
@click.option("--convert-timeout", type=float, default=defaults.SDF_CONVERT_TIMEOUT_S, show_default=True,
              help="Seconds after which a conversion child is killed and its job fails.")
@click.option("--worker-id", help="Name in the broker's health report (default: a random id).")
@peer_keys_option
@verbose_option
def sdf_worker(endpoints, sdf_job_port, sdf_result_port, procs, heartbeat_interval, convert_timeout, worker_id,
               key, broker_key, verbose) -> None:
    """Run an SDF worker: converts GLBs to Drake SDF packages, --procs at a time.

    Example: geomgen sdf-worker --procs 8 --broker hub
    """
    from geomgen import sdf_worker as worker_role

    overrides = {"sdf_job_port": sdf_job_port, "sdf_result_port": sdf_result_port}
    endpoints = Endpoints(**{**endpoints.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    _logging(verbose)
    sys.exit(worker_role.main(endpoints, procs=procs, heartbeat_interval_s=heartbeat_interval,
                              convert_timeout_s=convert_timeout, worker_id=worker_id,
                              keys=peer_keys(key, broker_key)))


@cli.command()
@click.option("--backend", "backends", multiple=True, default=("silhouette", "mesh"), show_default=True,
              help="Backend to serve (repeatable); GPU backends get one worker per visible GPU.")
@click.option("--sdf-workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="SDF conversion processes.")
@click.option("--host", default=defaults.HOST, show_default=True, help="Where the broker binds.")
@click.option("--port", type=int, default=defaults.CLIENT_PORT, show_default=True,
              help="The broker's base port (0: pick free ports).")
@click.option("--gpu", "gpus", multiple=True, help="GPU ids to use (default: CUDA_VISIBLE_DEVICES or nvidia-smi).")
@backend_options_option
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the processes' logs, kept after exit (default: a new folder "
                   "$XDG_STATE_HOME/geomgen/logs/serve-DATE-TIME-PID, ~/.local/state without XDG_STATE_HOME).")
@click.option("--ready-timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for every worker to load its backend.")
@click.option("--keys", "keys_dir", envvar="GEOMGEN_KEYS", type=click.Path(file_okay=False, path_type=Path),
              help="Key folder: CURVE for the stack, a key made there for each process started and for a "
                   "client (clients/serve-client.key_secret) [env GEOMGEN_KEYS]. Needed off loopback.")
@click.option("--http", metavar="HOST:PORT",
              help="Also serve the HTTP API (`geomgen gateway`) there, items under the working directory.")
@click.option("--http-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Bearer token file for --http (needed when its HOST is not loopback).")
@logs.log_options
@cache_options
def serve(backends, sdf_workers, host, port, gpus, backend_options, log_dir, ready_timeout, keys_dir, http,
          http_token_file, cache_dir, cache_size, no_cache) -> None:
    """Run a broker with its GPU workers and SDF workers; Ctrl-C stops them all.

    Example: geomgen serve --backend hunyuan3d --backend mesh --sdf-workers 4
    """
    from geomgen.server import GeometryServer

    logs.setup_from_context()
    log_dir = log_dir or logs.default_log_dir("serve")
    server = GeometryServer(backends=backends, sdf_workers=sdf_workers, host=host, base_port=port,
                            backend_options=backend_options, gpus=gpus or None, log_dir=log_dir, keys_dir=keys_dir,
                            http=http, http_options={"allow_roots": [str(Path.cwd())],
                                                     "token_file": http_token_file} if http else None,
                            **cache_settings(cache_dir, cache_size, no_cache))
    server.env.update(logs.child_env())  # its processes log as it does
    server.start()
    logs.say(f"geomgen: logs in {server.log_dir}")
    try:
        stats = server.wait_until_ready(ready_timeout)
    except BaseException:
        server.stop()
        raise
    workers = ", ".join(f"{name} x{n['alive']}" for name, n in stats.get("backends", {}).items() if n.get("alive"))
    logs.say(f"geomgen serving on {server.address} ({workers}; {stats.get('sdf_slots', 0)} SDF slots); "
             f"logs in {server.log_dir}; Ctrl-C stops")
    if http:
        logs.say(f"geomgen: HTTP API on {server.http_address}")
    if keys_dir is not None:
        logs.say(f"geomgen: CURVE on; a client key: --key {keys_dir}/clients/serve-client.key_secret "
                 f"--broker-key {keys_dir}/broker.key")
    sys.exit(server.serve_forever())


# The user-facing commands live beside this module; imported last because they
# use the shared options above.
from geomgen import cli_tasks  # noqa: E402

for _command in (cli_tasks.generate, cli_tasks.demo, cli_tasks.health, cli_tasks.convert, cli_tasks.doctor):
    cli.add_command(_command)

from geomgen import cli_keys  # noqa: E402

cli.add_command(cli_keys.keys)

from geomgen import cli_gateway  # noqa: E402

cli.add_command(cli_gateway.gateway)

from geomgen import cli_slurm  # noqa: E402

cli.add_command(cli_slurm.slurm)

from geomgen import cli_config  # noqa: E402

cli.add_command(cli_config.config_group)

from geomgen import cli_report  # noqa: E402

cli.add_command(cli_report.report)
