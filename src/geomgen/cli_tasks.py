"""The user-facing ``geomgen`` commands: generate, demo, health, convert, doctor.

`generate` and `demo` run the Python client, against ``--broker`` or against an
embedded GeometryServer on free ports that lives as long as the command.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import click

from geomgen import cli_report, defaults
from geomgen.cli import (
    EXIT_FAILED_ITEMS,
    convert_fields,
    backend_options_option,
    broker_option,
    convert_options,
    peer_keys,
    peer_keys_option,
)
from geomgen.errors import GeomgenError

SAMPLES = Path(__file__).resolve().parent / "samples"


def choose_backends(inputs: list[Path], backend: str) -> list[str]:
    """Backends an embedded stack needs for ``inputs``: ``backend`` itself, or for
    ``auto`` the first loadable GPU backend (silhouette without a GPU) for images
    and ``mesh`` for meshes. Unreadable inputs are skipped (the client reports them)."""
    from geomgen.batch import read_input
    from geomgen.inputs import sniff_kind

    kinds = set()
    for path in inputs:
        try:
            kinds.add(sniff_kind(path.name, read_input(path)))
        except GeomgenError:
            continue
    if not kinds:
        return []
    if backend != "auto":
        return [backend]
    return ([_image_backend()] if "image" in kinds else []) + (["mesh"] if "mesh" in kinds else [])


def _image_backend() -> str:
    from geomgen.backends import GPU_BACKENDS, load_backend_class
    from geomgen.server import visible_gpus

    if visible_gpus():
        for name in GPU_BACKENDS:
            try:
                if load_backend_class(name).check() is None:
                    return name
            except GeomgenError:
                continue
    return "silhouette"


@contextlib.contextmanager
def broker_address(endpoints, backends: list[str], backend_options: dict, sdf_workers: int,
                   timeout_s: float, keys=None, no_cache: bool = False) -> Iterator[tuple[str, Any]]:
    """(address, CURVE keys) of the broker to talk to: ``endpoints`` with ``keys``
    if given, else an embedded stack running ``backends`` (loopback, no keys)
    whose broker keeps results in the per-user result cache unless ``no_cache``."""
    if endpoints is not None:
        yield endpoints.client, keys
        return
    if not backends:
        yield f"tcp://{defaults.HOST}:{defaults.CLIENT_PORT}", None  # nothing will be sent
        return
    from geomgen.server import GeometryServer

    click.echo(f"geomgen: starting an embedded stack: {', '.join(backends)}, {sdf_workers} SDF process(es)",
               err=True)
    server = GeometryServer(backends=backends, sdf_workers=sdf_workers, base_port=0, backend_options=backend_options,
                            **({"no_cache": True} if no_cache else {}))
    try:
        server.start()
        server.wait_until_ready(timeout_s)
        yield server.address, None  # loopback only, no keys
    finally:
        server.stop()


def run_batch(address: str, requests: list, timeout_s: float, on_result, keys=None) -> list:
    """Send ``requests`` and call ``on_result(result, progress)`` as each completes; returns results by index.
    ``keys``: the client's CURVE keys (keys.PeerKeys) or None."""
    from geomgen.client import FINAL, GeometryClient
    from geomgen.progress import Progress

    results: list = [None] * len(requests)
    progress = Progress(len(requests))
    with GeometryClient(address, timeout_s=timeout_s, keys=keys) as client:
        try:
            for event in client.generate_events(requests):
                progress.update(event)
                if event.kind == FINAL:
                    results[event.index] = event.result
                    on_result(event.result, progress)
        finally:
            progress.close()
    return results


def _row(result, input_path: Path) -> dict[str, Any]:
    return {
        "index": result.index, "input": str(input_path), "status": "ok" if result.ok else "error",
        "glb_path": str(result.glb_path) if result.glb_path else None,
        "sdf_path": str(result.sdf_path) if result.sdf_path else None,
        "stage": result.stage, "error": result.error, "seconds": round(result.timings.get("client_s", 0.0), 3),
        "backend": result.backend or None, "warnings": result_warnings(result), "cached": result.cached,
        **{f"{fmt}_path": str(path) for fmt, path in result.format_paths().items() if fmt != "sdf"},
    }


def sniff_kind_of(path: Path) -> str | None:
    """"image" or "mesh" for an input file (by its first bytes and its name); None if unreadable."""
    from geomgen.inputs import sniff_kind

    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
        return sniff_kind(path.name, head)
    except (OSError, GeomgenError):
        return None


def result_warnings(result) -> list[str]:
    """What a person should know about a result: the converter's warnings and the backend's."""
    info = result.info or {}
    generate = info.get("generate") if isinstance(info.get("generate"), dict) else {}
    found = [*(info.get("warnings") or []), *(generate.get("warnings") or [])]
    return [str(w) for w in found]


def _line(result, input_path: Path) -> str:
    if result.ok:
        target = result.sdf_path or result.glb_path
        cached = ", cached" if result.cached else ""
        line = (f"ok     {input_path.name} -> {target}  [{result.backend}, {result.timings.get('client_s', 0):.1f} s"
                f"{cached}]")
        return line + "".join(f"\n       warning: {w}" for w in result_warnings(result))
    return f"error  {input_path.name}: {result.stage}/{result.error_code}: {result.error}"


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: <stem>.glb and <stem>/<stem>.sdf per input.")
@click.option("--backend", default="auto", show_default=True,
              help="auto: the first GPU backend with a worker (silhouette without one) for images, mesh for meshes.")
@click.option("--broker", "broker", help="Broker address (HOST, HOST:PORT, tcp://HOST:PORT); "
                                         "without it an embedded stack runs for the command.")
@click.option("--scene-id", help="Round-robin key shared by these requests.")
@click.option("--prompt", help="Text prompt, for backends that use one.")
@backend_options_option
@convert_options
@click.option("--no-sdf", is_flag=True, help="Stop after the GLB.")
@click.option("--height", "height_m", type=click.FloatRange(min=0, min_open=True), metavar="METRES",
              help="Height of the objects in the images (an image carries no scale): the silhouette backend "
                   "builds them that tall and the SDF package is scaled to it.")
@click.option("--sdf-workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="SDF processes of the embedded stack.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input on stdout.")
@click.option("--timeout", "timeout_s", type=float, default=defaults.CLIENT_TIMEOUT_S, show_default=True,
              help="Seconds of broker silence before outstanding inputs fail.")
@click.option("--fresh", is_flag=True,
              help="Compute every result anew even if the broker's result cache holds it (the new results "
                   "replace the cached ones), e.g. after changing a seed the cache does not see.")
@click.option("--no-cache", is_flag=True,
              help="The embedded stack keeps no result cache (without --broker; a broker's own cache is "
                   "skipped with --fresh).")
@peer_keys_option
def generate(inputs, out_dir, backend, broker, scene_id, prompt, backend_options, no_sdf, height_m, sdf_workers,
             as_json, timeout_s, fresh, no_cache, key, broker_key, **convert_params) -> None:
    """Turn images (or meshes) into GLBs and Drake SDF packages.

    \b
    Examples:
      geomgen generate chair.png --out assets/ --material wood --height 0.9
      geomgen generate photos/*.jpg --out assets/ --broker hub --json
      geomgen generate table.obj --out assets/ --mass-kg 20 --dimensions 1.2 0.8 0.75

    Results already computed come from the broker's result cache (the embedded
    stack's is per user: ~/.cache/geomgen/results); --fresh computes them anew.
    Exits 1 if any input failed.
    """
    from geomgen.client import GeometryRequest
    from geomgen.endpoints import parse_broker

    fields = convert_fields(convert_params)
    backend_options = dict(backend_options)
    if height_m is not None:
        if fields.get("dimensions") or fields.get("scale"):
            raise click.UsageError("give one of --height, --dimensions and --scale: each sets the size")
        fields["height_m"] = height_m
        backend_options.setdefault("silhouette.height_m", str(height_m))
    elif not fields.get("dimensions") and not fields.get("scale") and any(
            sniff_kind_of(path) == "image" for path in inputs):
        click.echo("geomgen: warning: images carry no scale and no --height or --dimensions was given: objects "
                   "get the backend's default size (silhouette: 1 m tall); give --height METRES", err=True)
    endpoints = parse_broker(broker) if broker else None
    if no_cache and endpoints is not None:
        raise click.UsageError("--no-cache applies to the embedded stack; with --broker, --fresh skips its cache")
    # ConvertOptions fields that GeometryRequest has no field of its own for travel in convert_options.
    extra = {name: fields.pop(name) for name in ("preview",) if name in fields}
    requests = [GeometryRequest(image_path=path, output_dir=out_dir, backend=backend, scene_id=scene_id,
                                prompt=prompt, backend_options=backend_options, want_sdf=not no_sdf, fresh=fresh,
                                convert_options=dict(extra), **fields)
                for path in inputs]
    backends = [] if endpoints else choose_backends(list(inputs), backend)

    def report(result, progress) -> None:
        if as_json:
            progress.print(json.dumps(_row(result, inputs[result.index])))
        else:
            progress.print(_line(result, inputs[result.index]))

    with broker_address(endpoints, backends, backend_options, 0 if no_sdf else sdf_workers, timeout_s=300.0,
                        keys=peer_keys(key, broker_key), no_cache=no_cache) as (address, keys):
        results = run_batch(address, requests, timeout_s, report, keys)
    failed = sum(not r.ok for r in results)
    used = sorted({r.backend for r in results if r.ok and r.backend})
    click.echo(f"geomgen: {len(results) - failed} ok, {failed} failed; backend(s) used: {', '.join(used) or '-'}; "
               f"outputs in {out_dir}", err=True)
    if not no_sdf:
        click.echo(cli_report.report_line(out_dir), err=True)
    sys.exit(EXIT_FAILED_ITEMS if failed else 0)


# Images carry no scale: the demo gives each sample its real height (m) and a material.
DEMO_SAMPLES = {
    "mug.png": (0.10, "ceramic"),
    "vase.png": (0.35, "ceramic"),
    "chair.png": (0.90, "wood"),
    "lamp.png": (0.55, "plastic"),
    "table.glb": (None, "wood"),
}


@click.command()
@click.option("--out", "out_dir", default=Path("geomgen-demo"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--collision", type=click.Choice(["coacd", "vhacd", "hull"]), default="coacd", show_default=True,
              help="Collision geometry of the SDF packages.")
@click.option("--sdf-workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="SDF conversion processes.")
def demo(out_dir, collision, sdf_workers) -> None:
    """Run the whole pipeline on the bundled sample images and mesh.

    Starts an embedded broker, workers for the backends the samples need and
    an SDF worker; prints a table of results and where the SDF files are.
    """
    from geomgen.client import GeometryRequest
    from geomgen.inputs import IMAGE_SUFFIXES, MESH_SUFFIXES

    inputs = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + MESH_SUFFIXES)
    if not inputs:
        raise click.ClickException(f"no sample inputs in {SAMPLES}; reinstall geomgen")
    requests = []
    for path in inputs:
        height_m, material = DEMO_SAMPLES.get(path.name, (None, None))
        # Scoped: on a GPU box "auto" may pick hunyuan3d for images, which has no height_m.
        options = {"silhouette.height_m": str(height_m)} if height_m and path.suffix.lower() in IMAGE_SUFFIXES else {}
        requests.append(GeometryRequest(image_path=path, output_dir=out_dir, collision=collision,
                                        backend_options=options, material=material))
    with broker_address(None, choose_backends(inputs, "auto"), {}, sdf_workers, timeout_s=300.0) as (address, _):
        results = run_batch(address, requests, defaults.CLIENT_TIMEOUT_S, lambda r, p: None)
    header = f"{'input':<14} {'backend':<11} {'status':<7} {'pieces':>6} {'mass kg':>8} {'seconds':>8}  sdf"
    click.echo(header)
    for path, result in zip(inputs, results):
        pieces = result.info.get("pieces", result.info.get("collision_pieces", ""))
        pieces = len(pieces) if isinstance(pieces, list) else pieces
        mass = result.info.get("mass_kg")
        click.echo(f"{path.name:<14} {result.backend:<11} {'ok' if result.ok else 'FAILED':<7} {pieces!s:>6} "
                   f"{mass if mass is None else round(mass, 3)!s:>8} {result.timings.get('client_s', 0):>8.1f}  "
                   f"{result.sdf_path if result.ok else f'{result.stage}: {result.error}'}")
    failed = sum(not r.ok for r in results)
    click.echo(f"\nSDF packages in {out_dir.resolve()}/<name>/<name>.sdf; {len(results) - failed} of "
               f"{len(results)} ok.")
    click.echo(cli_report.report_line(out_dir))
    sys.exit(EXIT_FAILED_ITEMS if failed else 0)


@click.command()
@broker_option
@click.option("--json", "as_json", is_flag=True, help="Print the broker's statistics as JSON.")
@click.option("--timeout", "timeout_s", type=float, default=5.0, show_default=True,
              help="Seconds to wait for the broker's answer.")
@peer_keys_option
def health(endpoints, as_json, timeout_s, key, broker_key) -> None:
    """Show the broker's workers, queues and statistics.

    Example: geomgen health --broker hub:5555 --json
    """
    from geomgen.client import GeometryClient

    with GeometryClient(endpoints.client, timeout_s=timeout_s, keys=peer_keys(key, broker_key)) as client:
        stats = client.health(timeout_s)
    click.echo(json.dumps(stats, indent=2, sort_keys=True) if as_json else render_health(stats))


def render_health(stats: dict) -> str:
    """A readable table of a HealthReply's stats."""
    def sec(key: str) -> str:
        value = stats.get(key)
        return "-" if value is None else f"{value:.2f} s"

    lines = [f"broker {stats.get('broker_id', '?')}  version {stats.get('version', '?')}  "
             f"up {stats.get('uptime_s', 0):.0f} s",
             "",
             f"{'backend':<14}{'alive':>6}{'busy':>6}{'queued':>8}{'completed':>11}{'failed':>8}"]
    for name, b in sorted(stats.get("backends", {}).items()):
        lines.append(f"{name:<14}{b.get('alive', 0):>6}{b.get('busy', 0):>6}{b.get('queued', 0):>8}"
                     f"{b.get('completed', 0):>11}{b.get('failed', 0):>8}")
    workers = stats.get("workers", [])
    if workers:
        lines += ["", f"{'worker':<14}{'backend':<12}{'host':<16}{'gpu':<5}{'pid':>8}  {'state':<6}{'done':>6}"]
    for w in workers:
        lines.append(f"{str(w.get('worker_id', '?'))[:12]:<14}{w.get('backend', '?'):<12}"
                     f"{str(w.get('hostname', ''))[:15]:<16}{str(w.get('gpu') or '-'):<5}{w.get('pid', '-')!s:>8}  "
                     f"{'busy' if w.get('busy') else 'idle':<6}{w.get('completed', 0):>6}")
    lines += [
        "",
        f"SDF workers {len(stats.get('sdf_workers', []))}: {stats.get('sdf_slots', 0)} slots, "
        f"{stats.get('sdf_free', 0)} free, {stats.get('sdf_queued', 0)} queued",
        f"in flight {stats.get('in_flight', 0)}, completed {stats.get('completed', 0)}, "
        f"failed {stats.get('failed', 0)}",
        f"average generate {sec('avg_generate_s')}, convert {sec('avg_convert_s')}, "
        f"queue wait {sec('avg_queue_wait_s')} (max {sec('max_queue_wait_s')})",
    ]
    cache = stats.get("cache") if isinstance(stats.get("cache"), dict) else {}
    if cache.get("enabled"):
        # By stage, one lookup per job and stage (the store's own counts include second looks).
        hits = cache.get("generate_hits", 0) + cache.get("convert_hits", 0)
        misses = cache.get("generate_misses", 0) + cache.get("convert_misses", 0)
        lines.append(f"result cache: {hits} hits, {misses} misses; "
                     f"{cache.get('entries', 0)} entries, {cache.get('bytes', 0) / 1e6:.1f} of "
                     f"{cache.get('max_bytes', 0) / 1e6:.0f} MB in {cache.get('dir', '?')}")
    elif cache:
        lines.append("result cache: off")
    return "\n".join(lines)


@click.command()
@click.argument("meshes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: <out>/<stem>/<stem>.sdf per mesh.")
@convert_options
@click.option("--up-axis", type=click.Choice(["y", "z"]), default="y", show_default=True,
              help="Up axis of the input meshes: y (glTF) or z (many CAD, OBJ and STL files).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
              default=defaults.SDF_CONVERT_TIMEOUT_S, show_default=True,
              help="Seconds one mesh may take; its conversion runs in a child process that is stopped then. "
                   "CoACD or V-HACD past half of the time left falls back to the next method.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per mesh on stdout.")
def convert(meshes, out_dir, up_axis, timeout_s, as_json, **convert_params) -> None:
    """Convert existing meshes (GLB, glTF, OBJ, PLY, STL) to Drake SDF packages, locally.

    \b
    Example:
      geomgen convert chair.glb lamp.obj --out assets/ --material wood --collision coacd

    A glTF or OBJ may use files beside it (buffers, textures, materials); files
    outside its folder are refused. Exits 1 if any mesh failed.
    """
    import time

    from geomgen.contract import convert_options as checked_convert_options
    from geomgen.conversion import convert_path
    from geomgen.geometry.formats import check_writable

    try:
        options = checked_convert_options({**convert_fields(convert_params), "up_axis": up_axis})
        check_writable(options.formats)
    except GeomgenError as exc:
        raise click.UsageError(exc.message) from None
    failed = 0
    for path in meshes:
        row: dict[str, Any] = {"input": str(path), "status": "ok", "sdf_path": None, "collision_pieces": None,
                               "method": None, "mass_kg": None, "seconds": None, "error": None, "warnings": []}
        start = time.monotonic()
        try:
            info = convert_path(path, out_dir, options, timeout_s)
            row.update(sdf_path=info["sdf_path"], method=info.get("method"), mass_kg=info.get("mass_kg"),
                       collision_pieces=info.get("pieces"), seconds=round(time.monotonic() - start, 3),
                       warnings=[str(w) for w in info.get("warnings") or []],
                       **{f"{fmt}_path": str(Path(info["sdf_path"]).parent / rel)
                          for fmt, rel in (info.get("formats") or {}).items() if fmt != "sdf"})
        except GeomgenError as exc:
            failed += 1
            row.update(status="error", error=f"{exc.stage.value}/{exc.code}: {exc.message}",
                       seconds=round(time.monotonic() - start, 3))
        except OSError as exc:  # the output folder, mostly
            failed += 1
            row.update(status="error", error=f"input/write_failed: {exc}", seconds=round(time.monotonic() - start, 3))
        if as_json:
            click.echo(json.dumps(row))
        elif row["status"] == "ok":
            click.echo(f"ok     {path.name} -> {row['sdf_path']}  [{row['method']}, {row['collision_pieces']} "
                       f"piece(s), {row['mass_kg']:.3f} kg, {row['seconds']:.1f} s]")
            for warning in row["warnings"]:
                click.echo(f"       warning: {warning}")
        else:
            click.echo(f"error  {path.name}: {row['error']}")
    sys.exit(EXIT_FAILED_ITEMS if failed else 0)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json) -> None:
    """Check this machine: packages, GPUs, and which backends can load here."""
    from geomgen import doctor as doctor_module

    checks = doctor_module.collect()
    click.echo(json.dumps([c._asdict() for c in checks], indent=2) if as_json else doctor_module.render(checks))
