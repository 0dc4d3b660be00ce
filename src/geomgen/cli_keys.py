"""``geomgen keys``: make the broker's CURVE key pair and its allow-lists, add, list and
revoke peers. Thin: the rules and the files are `geomgen.keys`'; this prints what
was done and the next step.
"""

from __future__ import annotations

from pathlib import Path

import click

from geomgen import keys as keyfiles
from geomgen.errors import InputError


def _folder(value: str | None) -> Path:
    if not value:
        raise InputError(f"no key folder: give --keys DIR or set {keyfiles.KEYS_ENV}", code="bad_key")
    return Path(value)


def keys_folder_option(fn):
    return click.option("--keys", "folder", envvar=keyfiles.KEYS_ENV, metavar="DIR",
                        help=f"The broker's key folder, made by `geomgen keys init` [env {keyfiles.KEYS_ENV}].")(fn)


@click.group()
def keys() -> None:
    """Make and manage CURVE keys: the broker's key pair and one allow-list per peer role.

    \b
    On the broker host:
      geomgen keys init ./keys
      geomgen keys add gpu-worker gpu-host-1 --keys ./keys
      geomgen broker --host 0.0.0.0 --keys ./keys
    Then copy keys/gpu-workers/gpu-host-1.key_secret and keys/broker.key to the GPU host.
    Roles: client, gpu-worker, sdf-worker. See docs/security.md.
    """


@keys.command()
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing broker key pair (every peer then needs the new broker.key).")
def init(folder: Path, force: bool) -> None:
    """Make the broker's key pair DIR/broker.key{,_secret} and the allow-list folders."""
    made = keyfiles.init_keys(folder, force=force)
    click.echo(f"made the broker key pair {keyfiles.fingerprint(made.public)} in {folder} (mode 700): "
               f"{keyfiles.BROKER_PUBLIC} goes to every peer, {keyfiles.BROKER_SECRET} never leaves this host")
    click.echo("allow-lists: " + ", ".join(f"{folder / sub}/" for sub in keyfiles.ROLES.values()))
    click.echo(f"next: geomgen keys add ROLE NAME --keys {folder}   (for each peer), "
               f"then geomgen broker --keys {folder}")


@keys.command()
@click.argument("role", metavar="ROLE")
@click.argument("name")
@keys_folder_option
def add(role: str, name: str, folder: str | None) -> None:
    """Make a key pair for peer NAME of ROLE (client, gpu-worker or sdf-worker) and allow it."""
    public_path, secret_path = keyfiles.add_peer(_folder(folder), role, name)
    print_key = keyfiles.fingerprint(keyfiles.public_key_of(public_path))
    broker_key = _folder(folder) / keyfiles.BROKER_PUBLIC
    click.echo(f"added {role} {name} ({print_key}): {public_path} allows it; "
               "a running broker picks it up within a second")
    click.echo(f"next: copy {secret_path} and {broker_key} to the peer (then delete the secret here); "
               f"start it with --key {secret_path.name} --broker-key {broker_key.name}")


@keys.command("list")
@keys_folder_option
def list_(folder: str | None) -> None:
    """List the broker key and every allowed peer with its key fingerprint."""
    path = _folder(folder)
    records = keyfiles.list_peers(path)
    broker = keyfiles.load_broker_keys(path)
    rows = [("ROLE", "NAME", "FINGERPRINT"), ("broker", "-", keyfiles.fingerprint(broker.public))]
    rows += [(r.role, r.name, r.fingerprint + ("  (secret still here)" if r.secret_here else "")) for r in records]
    for role, name, rest in rows:
        click.echo(f"{role:<11} {name:<24} {rest}")
    if not records:
        click.echo(f"no peers allowed yet; next: geomgen keys add ROLE NAME --keys {path}")
    elif any(r.secret_here for r in records):
        click.echo("once a secret is copied to its peer, delete it from this host")


@keys.command()
@click.argument("role", metavar="ROLE")
@click.argument("name")
@keys_folder_option
@click.option("--delete-secret", is_flag=True, help="Also delete NAME.key_secret if it is still here.")
def revoke(role: str, name: str, folder: str | None, delete_secret: bool) -> None:
    """Remove peer NAME of ROLE from the allow-list; the broker refuses its key from then on."""
    removed = keyfiles.revoke_peer(_folder(folder), role, name, delete_secret=delete_secret)
    click.echo(f"revoked {role} {name}: removed {', '.join(str(p) for p in removed)}; "
               "a running broker refuses the key within a second (at once on SIGHUP)")
    secret = _folder(folder) / keyfiles.role_folder(role) / (name + keyfiles.SECRET_SUFFIX)
    if secret.exists():
        click.echo(f"{secret} is kept; --delete-secret removes it")
    click.echo(f"next: if the peer should keep working, give it a new key: geomgen keys add {role} NEW-NAME")
