"""`geomgen gateway`: the old geometry server's HTTP API in front of a broker (gateway.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from geomgen import gateway as gateway_role
from geomgen.cli import _logging, broker_option, peer_keys, peer_keys_option, verbose_option


@click.command("gateway")
@broker_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; anything but loopback needs --token-file or --insecure.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=gateway_role.HTTP_PORT, show_default=True,
              help="HTTP port.")
@click.option("--default-backend", default="auto", show_default=True,
              help="Backend of items that name none (the old server's default was hunyuan3d).")
@click.option("--allow-root", "allow_roots", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder items may read inputs from and write outputs under (repeatable; symlinks and .. are "
                   "resolved first). Default: the working directory.")
@click.option("--allow-any-path", is_flag=True,
              help="Let items name any path this process can access, as the old server did.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding a bearer token required on every route but /health.")
@click.option("--insecure", is_flag=True, help="Bind off loopback without a token (logged loudly).")
@click.option("--keepalive", type=click.FloatRange(min=0.01), default=gateway_role.KEEPALIVE_S, show_default=True,
              help="Seconds between blank lines while a batch's items run.")
@click.option("--max-items", type=click.IntRange(min=1), default=gateway_role.MAX_ITEMS, show_default=True,
              help="Items one POST may carry; more: 413.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=gateway_role.MAX_BODY_BYTES,
              show_default=True, help="Bytes one POST body may have; more: 413.")
@click.option("--max-batches", type=click.IntRange(min=1), default=gateway_role.MAX_BATCHES, show_default=True,
              help="Batches running at once (one thread and one broker client each); more wait their turn.")
@peer_keys_option
@verbose_option
def gateway(endpoints, host, port, default_backend, allow_roots, allow_any_path, token_file, insecure, keepalive,
            max_items, max_body_bytes, max_batches, key, broker_key, verbose) -> None:
    """Serve the old geometry server's HTTP API (POST /generate_geometries, GET /health,
    GET /metrics, POST /shutdown) in front of a broker.

    \b
    Example:
      geomgen gateway --broker 127.0.0.1:5555 --port 7000 --allow-root /data
      curl -N -X POST localhost:7000/generate_geometries -H 'Content-Type: application/json' \\
        -d '[{"image_path": "/data/chair.png", "output_dir": "/data/out", "prompt": "a chair"}]'
    """
    if allow_any_path and allow_roots:
        raise click.UsageError("--allow-any-path and --allow-root exclude each other")
    _logging(verbose)
    settings = gateway_role.GatewaySettings(
        broker=endpoints.client, keys=peer_keys(key, broker_key), default_backend=default_backend,
        allow_roots=None if allow_any_path else list(allow_roots or [Path.cwd()]),
        token=gateway_role.read_token(token_file) if token_file is not None else None,
        keepalive_s=keepalive, max_items=max_items, max_body_bytes=max_body_bytes, max_batches=max_batches,
    )
    sys.exit(gateway_role.serve(settings, host=host, port=port, insecure=insecure))
