"""``geomgen config show``: each setting of a command, its value and where it came from
(a flag, an environment variable, the config file, or the default)."""

from __future__ import annotations

import json
import os
from typing import Any

import click
from click.core import ParameterSource

from geomgen import config as settings


@click.group("config")
def config_group() -> None:
    """Show the settings commands get from flags, the environment and the config file.

    \b
    Precedence: flag > environment variable > config file (--config FILE or GEOMGEN_CONFIG) > default.
    See docs/configuration.md.
    """


@config_group.command("show", context_settings={"ignore_unknown_options": True})
@click.argument("words", nargs=-1, type=click.UNPROCESSED, metavar="[COMMAND [FLAGS]...]")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: the file and a list of settings.")
@click.pass_context
def show(ctx: click.Context, words: tuple[str, ...], as_json: bool) -> None:
    """Print every setting of COMMAND (default: of all commands) as it would run now:
    its value and where it came from, in TOML a config file can start from.

    \b
    Examples:
      geomgen config show broker
      geomgen --config site.toml config show gpu-worker --backend mesh
      GEOMGEN_BROKER=hub:5555 geomgen config show generate --json
    """
    root_ctx = ctx.find_root()
    root = root_ctx.command
    assert isinstance(root, click.Group)
    loaded: settings.Loaded | None = ctx.meta.get("geomgen.config")
    targets = [_resolve(root, list(words))] if words else [(path, command, []) for path, command in
                                                             settings.commands(root)]
    rows = [row for path, command, flags in targets for row in _rows(root_ctx, path, command, flags, loaded)]
    file_info = None if loaded is None else {"path": str(loaded.path), "given_by": loaded.given_by}
    if as_json:
        click.echo(json.dumps({"config_file": file_info, "settings": rows}, indent=2, default=str))
        return
    click.echo(f"# config file: {loaded.path} (from {loaded.given_by})" if loaded is not None else
               f"# no config file (--config FILE or {settings.CONFIG_ENV})")
    command = None
    for row in rows:
        if row["command"] != command:
            command = row["command"]
            click.echo(f"\n[{'.'.join(command.split())}]")
        line = f"{row['key']} = {_toml(row['value'])}"
        if row["value"] is None:
            line = f"# {row['key']} = (unset)"
        click.echo(f"{line:<48} # {_source_text(row)}")


def _resolve(root: click.Group, words: list[str]) -> tuple[tuple[str, ...], click.Command, list[str]]:
    """(path, command, its flags) from ``config show`` words such as ``keys add --keys k``."""
    command: click.Command = root
    path: tuple[str, ...] = ()
    while isinstance(command, click.Group) and words and words[0] in command.commands:
        path += (words[0],)
        command = command.commands[words.pop(0)]
    if isinstance(command, click.Group):
        names = ", ".join(sorted(command.commands))
        where = " ".join(("geomgen", *path))
        unknown = f"{where} has no command {words[0]!r}; " if words else ""
        raise click.UsageError(f"{unknown}name a command of {where}: {names}")
    return path, command, words


def _rows(root_ctx: click.Context, path: tuple[str, ...], command: click.Command, flags: list[str],
          loaded: settings.Loaded | None) -> list[dict[str, Any]]:
    ctx = root_ctx
    for word, sub in zip(path, _chain(root_ctx.command, path)):
        ctx = click.Context(sub, info_name=word, parent=ctx)  # default_map descends by name
    parser = command.make_parser(ctx)
    opts, _, _ = parser.parse_args(args=list(flags))
    rows = []
    for key, param in settings.options(command):
        raw, source = param.consume_value(ctx, opts)
        value = _typed(ctx, param, raw)
        row: dict[str, Any] = {"command": " ".join(path), "key": key, "flag": param.opts[0], "value": value,
                               "source": "default", "from": None, "env": _env_names(param)}
        if source == ParameterSource.COMMANDLINE:
            row.update(source="flag", **{"from": param.opts[0]})
        elif source == ParameterSource.ENVIRONMENT:
            row.update(source="env", **{"from": next(n for n in row["env"] if _os_env(n))})
        elif source == ParameterSource.DEFAULT_MAP and loaded is not None:
            origin = loaded.origins.get((path, param.name))
            row.update(source="file", **{"from": f"{loaded.path} {origin.table} {origin.key}" if origin else
                                         str(loaded.path)})
        rows.append(row)
    return rows


def _chain(root: click.Command, path: tuple[str, ...]) -> list[click.Command]:
    chain, command = [], root
    for word in path:
        command = command.commands[word]  # type: ignore[attr-defined]
        chain.append(command)
    return chain


def _env_names(param: click.Parameter) -> list[str]:
    envvar = param.envvar
    return [] if not envvar else [envvar] if isinstance(envvar, str) else list(envvar)


def _os_env(name: str) -> bool:
    return bool(os.environ.get(name))


def _typed(ctx: click.Context, param: click.Parameter, raw: Any) -> Any:
    """The value as the option's type reads it (an env string "7" -> 7); None when unset."""
    if raw is None or repr(raw).endswith("UNSET"):  # click >= 8.3 marks "no value" with a sentinel
        return None
    try:
        value = param.type_cast_value(ctx, raw)
    except click.ClickException:
        return raw
    if isinstance(value, tuple):
        value = list(value)
    if value == [] or value == ():
        return [] if param.multiple else None
    return value


def _toml(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _source_text(row: dict[str, Any]) -> str:
    env = f"env {', '.join(row['env'])}" if row["env"] else "no env"
    if row["source"] == "default":
        return f"default; {env}"
    return f"{row['source']} {row['from']}" + ("" if row["source"] == "env" else f"; {env}")
