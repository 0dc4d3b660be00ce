"""Declared options: a name, a kind, a range, and one parser for all of them.

Backends declare their options and the conversion declares each collision
method's parameters with :class:`OptionSpec`, so that the client, the broker
and the workers refuse a misspelt or out-of-range option with the same
sentence, before any work is queued. Values may come typed (msgpack, JSON) or
as strings (``--backend-option key=value``); parsing normalises both.

A leaf module: it imports nothing of geomgen but the error tree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from geomgen.errors import InputError

KINDS = ("number", "integer", "switch", "choice", "text")
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True)
class OptionSpec:
    """One declared option.

    kind: number (a finite float in [low, high]), integer (in [low, high]),
    switch (true/false, on/off, yes/no, 1/0), choice (one of ``choices``,
    case-insensitive, with ``aliases`` mapping other spellings onto them), text
    (a string, stripped; non-empty unless ``allow_empty``; matching ``pattern``
    when given). ``per_request`` False: fixed when the worker starts (a request
    may only repeat the worker's value). ``default`` is documentation and the
    value :func:`resolve_options` fills in; None means "not set".
    """

    name: str
    kind: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    pattern: str | None = None
    allow_empty: bool = False
    per_request: bool = True
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def parse(self, value: Any, owner: str = "") -> Any:
        """``value`` checked and normalised; InputError ``bad_option`` naming the option and its range."""
        where = f"{owner} option {self.name}" if owner else f"option {self.name}"
        parser = _PARSERS[self.kind]
        out = parser(self, value)
        if out is _BAD:
            raise InputError(f"{where} must be {self.describe()}, got {value!r}", code="bad_option")
        return out

    def describe(self) -> str:
        """What the option takes, as the end of a sentence ("an integer from 1 to 200")."""
        if self.kind in ("number", "integer"):
            noun = "a number" if self.kind == "number" else "an integer"
            if self.low is not None and self.high is not None:
                return f"{noun} from {self.low:g} to {self.high:g}"
            if self.low is not None:
                return f"{noun} >= {self.low:g}"
            return f"{noun} <= {self.high:g}" if self.high is not None else noun
        if self.kind == "switch":
            return "true or false (on/off)"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.pattern:
            return f"a string matching {self.pattern}"
        return "a string" if self.allow_empty else "a non-empty string"

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able map, for a worker's READY (the broker checks requests with it)."""
        return {"name": self.name, "kind": self.kind, "default": self.default, "low": self.low, "high": self.high,
                "choices": list(self.choices), "aliases": dict(self.aliases), "pattern": self.pattern,
                "allow_empty": self.allow_empty, "per_request": self.per_request, "help": self.help}

    @classmethod
    def from_wire(cls, data: Any) -> "OptionSpec":
        """The inverse of to_wire; ValueError on anything malformed (a peer's map)."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
            raise ValueError("an option declaration needs a name")
        low, high = data.get("low"), data.get("high")
        for bound in (low, high):
            if bound is not None and (not _is_number(bound) or not math.isfinite(bound)):
                raise ValueError(f"option {data['name']!r}: bounds must be numbers")
        choices, aliases = data.get("choices") or [], data.get("aliases") or {}
        if not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise ValueError(f"option {data['name']!r}: choices must be strings")
        if not (isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values())):
            raise ValueError(f"option {data['name']!r}: aliases must map strings to strings")
        pattern = data.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise ValueError(f"option {data['name']!r}: pattern must be a string")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"option {data['name']!r}: pattern {pattern!r} is not a regular expression ({exc})") from None
        return cls(name=data["name"], kind=str(data.get("kind")), default=data.get("default"), low=low, high=high,
                   choices=tuple(choices), aliases={str(k): v for k, v in aliases.items()}, pattern=pattern,
                   allow_empty=bool(data.get("allow_empty")), per_request=bool(data.get("per_request", True)),
                   help=str(data.get("help") or ""))


Specs = tuple  # tuple[OptionSpec, ...]


def parse_options(owner: str, specs: Iterable[OptionSpec], values: Mapping[str, Any], *,
                  hint: str = "") -> dict[str, Any]:
    """The given ``values`` checked against ``specs`` and normalised (no defaults
    added; None values dropped). InputError ``bad_option`` for an unknown name
    (listing the known ones, then ``hint``) or a bad value."""
    if not isinstance(values, Mapping):
        raise InputError(f"{owner} options must be a map of name -> value", code="bad_option")
    by_name = {spec.name: spec for spec in specs}
    unknown = sorted(str(k) for k in values if k not in by_name)
    if unknown:
        known = ", ".join(by_name) or "none"
        raise InputError(f"unknown {owner} option(s) {', '.join(unknown)}; known: {known}{hint}", code="bad_option")
    return {name: by_name[name].parse(value, owner) for name, value in values.items() if value is not None}


def resolve_options(owner: str, specs: Iterable[OptionSpec], values: Mapping[str, Any], *,
                    hint: str = "") -> dict[str, Any]:
    """Every declared option: the parsed value given, else its default."""
    specs = tuple(specs)
    given = parse_options(owner, specs, values, hint=hint)
    return {spec.name: given.get(spec.name, spec.default) for spec in specs}


def specs_to_wire(specs: Iterable[OptionSpec] | None) -> list[dict] | None:
    return None if specs is None else [spec.to_wire() for spec in specs]


def specs_from_wire(data: Any) -> tuple[OptionSpec, ...] | None:
    """Declarations from a peer: None when it declared none (its options are
    then checked only where they run); ValueError when malformed."""
    if data is None:
        return None
    if not isinstance(data, list):
        raise ValueError("option declarations must be a list")
    return tuple(OptionSpec.from_wire(item) for item in data)


# --- parsers, one per kind ------------------------------------------------------

_BAD = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(spec: OptionSpec, number: float) -> bool:
    return (spec.low is None or number >= spec.low) and (spec.high is None or number <= spec.high)


def _number(spec: OptionSpec, value: Any) -> Any:
    if isinstance(value, bool):
        return _BAD
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value) if _is_number(value) else math.nan
    except (ValueError, OverflowError):
        return _BAD
    return number if math.isfinite(number) and _in_range(spec, number) else _BAD


def _integer(spec: OptionSpec, value: Any) -> Any:
    if isinstance(value, bool):
        return _BAD
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            number = int(text)  # int() first so that large seeds keep every digit
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                return _BAD
            if not (math.isfinite(as_float) and as_float == int(as_float)):
                return _BAD
            number = int(as_float)
    else:
        return _BAD
    return number if _in_range(spec, number) else _BAD


def _switch(spec: OptionSpec, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else ""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return _BAD


def _choice(spec: OptionSpec, value: Any) -> Any:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        text = str(value).strip().lower()
    else:
        return _BAD
    if text in spec.choices:
        return text
    return spec.aliases.get(text, _BAD)


def _text(spec: OptionSpec, value: Any) -> Any:
    if not isinstance(value, str):
        return _BAD
    text = value.strip()
    if not text and not spec.allow_empty:
        return _BAD
    if spec.pattern and not re.fullmatch(spec.pattern, text):
        return _BAD
    return text


_PARSERS = {"number": _number, "integer": _integer, "switch": _switch, "choice": _choice, "text": _text}
