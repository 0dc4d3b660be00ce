"""Settings of every command from one TOML file and from environment variables.

Each command option is also a file key and an environment variable, derived
from its name, so an option added to any command gets both with no extra code:

- file: ``[broker] max_jobs = 100`` (a table per command; ``[keys.add]`` for a
  subcommand), and in the ``[all]`` table the shared keys below, which apply to
  every command that has the option (TOML cannot hold both a top-level
  ``broker = "tcp://..."`` and a ``[broker]`` table);
- environment: ``GEOMGEN_<COMMAND>_<OPTION>`` (``GEOMGEN_BROKER_MAX_JOBS``,
  ``GEOMGEN_GPU_WORKER_BACKEND``), and ``GEOMGEN_<OPTION>`` for the shared ones
  (``GEOMGEN_BROKER``, ``GEOMGEN_LOG_LEVEL``, ``GEOMGEN_KEYS``...).

click resolves the precedence (flag > environment > file > default): the file
becomes the context's ``default_map``. The file is validated first, every key of
every table, by a pydantic model built from the options' click types, and then
by the options' own click type and check, so an error names the file, the key
and the value before any command runs. pydantic is imported only when a file
is given (its import costs every command about 0.1 s).
"""

from __future__ import annotations

import difflib
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional, Union

import click
from click.core import ParameterSource

from geomgen.errors import GeomgenError, InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

CONFIG_ENV = "GEOMGEN_CONFIG"
ENV_PREFIX = "GEOMGEN"
# Options that mean the same thing on every command that has them: one top-level
# file key and one environment variable each, without the command's name.
SHARED = ("broker", "key", "broker_key", "keys", "log_level", "log_format", "cache_dir", "cache_size", "no_cache")
# Environment variables geomgen reads for other purposes; no option may derive one of them.
RESERVED_ENV = (CONFIG_ENV, "GEOMGEN_BACKENDS", "GEOMGEN_CONVERT_FN")
SKIPPED = ("verbose",)
ALL = "all"  # the table of shared keys ([broker] is a command's table, so the address cannot be a top-level key)  # -v/-vv: --log-level is its setting

Path_ = tuple[str, ...]  # a command's path below the root group: ("broker",), ("keys", "add")


# --- names ---------------------------------------------------------------------------------


def option_key(param: click.Parameter) -> str | None:
    """The file key of an option: its first long flag, ``--max-jobs`` -> ``max_jobs``;
    None for arguments, short-only options and the ones settings skip."""
    if not isinstance(param, click.Option) or (param.is_eager and not param.expose_value):  # --help, --version
        return None
    longs = [opt for opt in param.opts if opt.startswith("--")]
    if not longs:
        return None
    key = longs[0][2:].replace("-", "_")
    return None if key in SKIPPED else key


def env_name(path: Path_, key: str) -> str:
    """The environment variable of option ``key`` of the command at ``path``."""
    words = [key] if key in SHARED else [*path, key]
    return "_".join([ENV_PREFIX, *words]).upper().replace("-", "_")


def commands(group: click.Group, path: Path_ = ()) -> Iterator[tuple[Path_, click.Command]]:
    """Every command below ``group`` that runs (not the groups), with its path."""
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


def options(command: click.Command) -> Iterator[tuple[str, click.Option]]:
    """(file key, option) of every option of ``command`` that settings cover."""
    for param in command.params:
        key = option_key(param)
        if key is not None:
            yield key, param  # type: ignore[misc]


def attach_envvars(root: click.Group) -> None:
    """Give every option without an environment variable its derived one (idempotent;
    an option that has one, such as --key's GEOMGEN_KEY, keeps it)."""
    for path, command in commands(root):
        for key, param in options(command):
            if param.envvar is None:
                param.envvar = env_name(path, key)
                param.show_envvar = True  # in --help
                param.get_error_hint = types.MethodType(_error_hint, param)  # type: ignore[method-assign]


def _error_hint(param: click.Parameter, ctx: click.Context | None) -> str:
    """click's "'--port'" in an error, naming the environment variable only when the
    value came from it (click's show_envvar would name it for a flag's value too)."""
    hint = click.Parameter.get_error_hint(param, ctx)
    if ctx is not None and param.name and ctx.get_parameter_source(param.name) == ParameterSource.ENVIRONMENT:
        hint += f" (env var: '{param.envvar}')"
    return hint


# --- the file --------------------------------------------------------------------------------


@dataclass
class Origin:
    """Where a setting of the file was written: ``table`` is ``[broker]`` or ``top level``."""

    table: str
    key: str
    value: Any
    depth: int = 0  # 0 top level, 1 a command's or group's table, ...: the deepest wins


@dataclass
class Loaded:
    """A validated config file: click's nested default_map, and where each value came from."""

    path: Path
    given_by: str  # "--config" or "GEOMGEN_CONFIG"
    default_map: dict[str, Any] = field(default_factory=dict)
    origins: dict[tuple[Path_, str], Origin] = field(default_factory=dict)  # (path, param name) -> origin


def _fail(path: Path, problems: list[str]) -> InputError:
    return InputError(f"config file {path}: " + "; ".join(dict.fromkeys(problems)), code="bad_config")


def _show(value: Any) -> str:
    return json.dumps(value, default=str)


def load(path: Path, root: click.Group, given_by: str = "--config") -> Loaded:
    """Read and validate config file ``path`` for the commands under ``root``.

    Raises InputError ``bad_config`` naming the file, and for each problem the
    table, the key and the value: missing file, invalid TOML, unknown table or
    key, wrong type, a value the option refuses.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"config file {path} (from {given_by}) does not exist", code="bad_config") from None
    except OSError as exc:
        raise InputError(f"config file {path} (from {given_by}) cannot be read: {exc.strerror}",
                         code="bad_config") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"config file {path} is not valid TOML: {exc}", code="bad_config") from None
    problems: list[str] = []
    per_command: dict[Path_, dict[str, Origin]] = {p: {} for p, _ in commands(root)}
    keys_of = {p: {key for key, _ in options(c)} for p, c in commands(root)}
    _collect(document, root, (), "top level", per_command, keys_of, problems)
    loaded = Loaded(path.resolve(), given_by)
    for command_path, command in commands(root):
        settings = per_command[command_path]
        if settings:
            _validate(command_path, command, settings, problems)
        for key, param in options(command):
            if key in settings:
                loaded.origins[(command_path, param.name)] = settings[key]
                table = loaded.default_map
                for word in command_path:
                    table = table.setdefault(word, {})
                table[param.name] = settings[key].value
    if problems:
        raise _fail(path, problems)
    return loaded


def _keys_below(group: click.Group) -> set[str]:
    return {key for _, command in commands(group) for key, _ in options(command)}


def _collect(table: dict, group: click.Group, path: Path_, label: str, per_command: dict[Path_, dict[str, Origin]],
             keys_of: dict[Path_, set[str]], problems: list[str]) -> None:
    """Spread the keys of ``table`` (the root's or a group's) over the commands they apply to:
    a sub-table goes to its command, a plain key to every command below that has the option."""
    known = _keys_below(group)
    allowed = {k for k in known if k in SHARED} if not path or path == (ALL,) else known
    for raw_key, value in table.items():
        if not path and raw_key == ALL and isinstance(value, dict):
            _collect(value, group, (ALL,), f"[{ALL}]", per_command, keys_of, problems)
            continue
        command = None if path == (ALL,) else (group.commands.get(raw_key)
                                                or group.commands.get(raw_key.replace("_", "-")))
        if isinstance(value, dict) and command is not None:
            sub_path = (*path, command.name or raw_key)
            sub_label = "[" + ".".join(sub_path) + "]"
            if isinstance(command, click.Group):
                _collect(value, command, sub_path, sub_label, per_command, keys_of, problems)
            else:
                for key, item in value.items():
                    _put(per_command[sub_path], key.replace("-", "_"), Origin(sub_label, key, item, len(sub_path)))
            continue
        key = raw_key.replace("-", "_")
        if isinstance(value, dict):
            names = sorted(group.commands)
            problems.append(f"{label}: unknown table [{'.'.join((*path, raw_key))}]{_did_you_mean(raw_key, names)}; "
                            f"tables are the commands: {', '.join(names)}")
        elif not path:
            where = f"[{ALL}]" if key in allowed else "the table of its command, e.g. [broker]"
            problems.append(f"{label}: {raw_key} = {_show(value)}: a key needs a table; put it in {where}")
        elif key not in allowed:
            if path == (ALL,) and key in known:
                problems.append(f"{label}: {raw_key} = {_show(value)}: not a shared key; put it in the table of "
                                f"its command, e.g. [broker]")
            else:
                problems.append(f"{label}: unknown key {raw_key} = {_show(value)}"
                                f"{_did_you_mean(key, sorted(allowed))}; keys here: {', '.join(sorted(allowed))}")
        else:
            scope = () if path == (ALL,) else path
            for command_path, settings in per_command.items():
                if command_path[:len(scope)] == scope and key in keys_of[command_path]:
                    _put(settings, key, Origin(label, raw_key, value, len(scope)))


def _put(settings: dict[str, Origin], key: str, origin: Origin) -> None:
    """Record ``origin`` for ``key`` unless a more specific table already set it."""
    if key not in settings or settings[key].depth <= origin.depth:
        settings[key] = origin


def _did_you_mean(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _validate(path: Path_, command: click.Command, settings: dict[str, Origin], problems: list[str]) -> None:
    """Check ``settings`` against the command's options: pydantic for the key and the
    type, then the option's click type and callback for the value."""
    import pydantic

    model = _model(path, command)
    try:
        model.model_validate({key: origin.value for key, origin in settings.items()})
    except pydantic.ValidationError as exc:
        keys = _keys_below_command(command)
        for error in exc.errors():
            key = str(error["loc"][0]) if error["loc"] else "?"
            origin = settings.get(key)
            where = origin.table if origin else "[" + ".".join(path) + "]"
            shown = f"{origin.key if origin else key} = {_show(origin.value if origin else error.get('input'))}"
            if error["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown key {shown}{_did_you_mean(key, keys)}; "
                                f"`geomgen config show {' '.join(path)}` lists the keys")
            else:
                message = error["msg"].removeprefix("Value error, ")
                problems.append(f"{where}: {shown}: {message}")


def _keys_below_command(command: click.Command) -> list[str]:
    return sorted(key for key, _ in options(command))


_MODELS: dict[int, Any] = {}


def _model(path: Path_, command: click.Command):
    """A pydantic model of the command's file keys (cached per command)."""
    import pydantic

    cached = _MODELS.get(id(command))
    if cached is not None:
        return cached
    fields: dict[str, Any] = {}
    for key, param in options(command):
        check = pydantic.AfterValidator(_click_check(path, command, param))
        fields[f"field_{key}"] = (Optional[Annotated[_annotation(param), check]],
                                  pydantic.Field(default=None, alias=key))
    model = pydantic.create_model("Settings_" + "_".join(path).replace("-", "_"),
                                  __config__=pydantic.ConfigDict(extra="forbid"), **fields)
    _MODELS[id(command)] = model
    return model


def _annotation(param: click.Option) -> Any:
    """The type a TOML value of ``param`` must have: bool, int, float (an int will do),
    str; a list of n for nargs=n, a list for a repeatable option."""
    from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr, conlist

    kind = param.type
    if param.is_flag or isinstance(kind, click.types.BoolParamType):
        base: Any = StrictBool
    elif param.count or isinstance(kind, click.types.IntParamType):
        base = StrictInt
    elif isinstance(kind, click.types.FloatParamType):
        base = Union[StrictFloat, StrictInt]
    else:
        base = StrictStr
    if param.nargs > 1:
        base = conlist(base, min_length=param.nargs, max_length=param.nargs)
    if param.multiple:
        base = list[base]  # type: ignore[valid-type]
    return base


def _click_check(path: Path_, command: click.Command, param: click.Option):
    """A validator running the option's own click type (ranges, choices, paths) and
    callback (``--broker``'s address) on a file value, as the command line would."""

    def check(value: Any) -> Any:
        if value is None:
            return value
        ctx = click.Context(command, info_name=path[-1], resilient_parsing=False)
        try:
            converted = param.type_cast_value(ctx, value)
            if param.callback is not None:
                param.callback(ctx, param, converted)
        except (click.ClickException, ValueError) as exc:
            raise ValueError(getattr(exc, "message", None) or str(exc)) from None
        except GeomgenError as exc:
            raise ValueError(exc.message) from None
        except Exception:  # noqa: BLE001 - a callback's own failure (it wanted other options), not the value's
            pass
        return value

    return check


# --- the root group -----------------------------------------------------------------------------


def config_option(fn):
    """``--config FILE`` (or GEOMGEN_CONFIG) on the root group."""
    return click.option(
        "--config", "config_file", envvar=CONFIG_ENV, metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
        help=f"TOML file of settings: a [COMMAND] table per command, shared keys (broker, keys, log_level...) "
             f"in [all] [env {CONFIG_ENV}]. Flags beat environment variables, which beat the file. "
             f"See `geomgen config show` and docs/configuration.md.",
    )(fn)


def apply(ctx: click.Context, config_file: Path | None) -> Loaded | None:
    """Make every option readable from its environment variable and, with a file, from
    the file: called by the root group before its subcommand parses its arguments."""
    root = ctx.command
    assert isinstance(root, click.Group)
    attach_envvars(root)
    if config_file is None:
        return None
    given_by = "--config" if ctx.get_parameter_source("config_file") == ParameterSource.COMMANDLINE else CONFIG_ENV
    loaded = load(config_file, root, given_by)
    ctx.default_map = loaded.default_map
    ctx.meta["geomgen.config"] = loaded
    return loaded
