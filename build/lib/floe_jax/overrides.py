"""`key=value` overrides of frozen config dataclasses, as the command line gives them.

Dotted keys reach nested configs (`fed.rounds.num_rounds=3`); each value is parsed by its field's
type annotation, and an unknown key, a key given twice or a bad value is a `ConfigError` naming
the key the user typed.
"""

from __future__ import annotations

import dataclasses
import math
import re

from floe_jax.config import ConfigError


def _convert(value: str, tp, where: str):
    """Parses the string `value` as type `tp` (the annotation of a dataclass field)."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options:
            try:
                return _convert(value, a, where)
            except ConfigError:
                if len(options) == 1:  # `float | None`: the float's own message
                    raise
        raise ConfigError(f"{where}: cannot parse {value!r} as {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {args}")
        return value
    if origin in (tuple, list):
        items = [v for v in value.strip("()[]").split(",") if v.strip()]
        inner = args[0] if args else str
        return tuple(_convert(v.strip(), inner, where) for v in items)
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a boolean (true/false), got {value!r}")
    if tp in (int, float, str):
        try:
            out = tp(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is float and not math.isfinite(out):  # `none` is how an optional says "no limit"
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return out
    if dataclasses.is_dataclass(tp) and hasattr(tp, "from_string"):
        return tp.from_string(value)  # e.g. an AggregationConfig from a method name
    if dataclasses.is_dataclass(tp):
        raise ConfigError(
            f"{where} is a group of settings; set one of its fields ({where}.NAME=...)"
        )
    raise ConfigError(f"{where}: fields of type {tp} cannot be set from the command line")


def _apply(obj, tree: dict, trail: list[str]):
    """`obj` with every override in `tree` (`{field: value str | subtree}`) applied in one
    `dataclasses.replace` per nested config, so a config validates its fields together."""
    import typing

    fields = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for name, value in tree.items():
        where = ".".join([*trail, name])
        if name not in fields:
            raise ConfigError(f"unknown setting {where!r}; known: {', '.join(sorted(fields))}")
        if isinstance(value, dict):
            child = getattr(obj, name)
            if not dataclasses.is_dataclass(child):
                raise ConfigError(f"{where!r} has no sub-settings")
            changes[name] = _apply(child, value, [*trail, name])
        else:
            changes[name] = _convert(value.strip(), hints[name], where)
    try:
        return dataclasses.replace(obj, **changes)
    except ConfigError as e:
        raise ConfigError(_located(str(e), type(obj).__name__, trail)) from None


def _located(msg: str, owner: str, trail: list[str]) -> str:
    """`msg` led by the setting's dotted path: a message naming `Owner.field` gets
    `fed.lora.field: ...` (the key the user typed), any other `fed.lora: ...`."""
    if not trail:
        return msg
    prefix = ".".join(trail)
    named = re.match(rf"{re.escape(owner)}\.(\w+)\b", msg)
    return f"{prefix}.{named[1]}: {msg}" if named else f"{prefix}: {msg}"


def apply_overrides(cfg, overrides: list[str] | tuple[str, ...]):
    """Returns `cfg` (a frozen dataclass) with `key=value` overrides applied.

    Dotted keys reach nested dataclasses (`fed.num_rounds=3`). Values are parsed by each field's
    type annotation; an unknown key, a key given twice or a value of the wrong type raises
    `ConfigError` naming it. The order of the overrides does not matter: all the fields set on
    one (nested) config are applied together, so `agg.prune_threshold=0.1 agg.method=hetlora`
    validates as one `AggregationConfig`.
    """
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        *parents, leaf = [k.strip() for k in key.strip().split(".")]
        node = tree
        for i, k in enumerate(parents):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"{'.'.join(parents[: i + 1])!r} is set and also has sub-settings"
                )
        if isinstance(node.get(leaf), dict):
            raise ConfigError(f"{key.strip()!r} is set and also has sub-settings")
        if leaf in node:
            raise ConfigError(f"setting {key.strip()!r} is given twice")
        node[leaf] = value
    return _apply(cfg, tree, []) if tree else cfg
