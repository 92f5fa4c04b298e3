"""Settings machinery: one dataclass per process, read from TOML/env, argv, and written as argv.

Why: a process's settings used to exist twice (a TOML section type and the process's own type,
with the runner translating one into the other's flags by hand), so a setting could exist on one
side only or be spelled differently. Now each process has ONE dataclass whose fields carry
:func:`setting` metadata, and the three surfaces are derived from it:

- the TOML/env loader (:mod:`pipeline.config`) coerces and checks ``[section]`` keys with
  :func:`coerce` and :func:`check` (errors name the dotted key: ``ingest.symbols[1]: ...``);
- the process's CLI adds one flag per field with :func:`add_arguments` and reads them back with
  :func:`values_from_args`;
- the runner writes a child's argv with :func:`to_argv`, so ``config -> argv -> parse`` gives the
  same config (tests/test_config.py checks that round trip for every process).

A field that cannot be on one surface says so and why (``flag=None, no_flag=...`` or
``toml=None, no_toml=...``): tests check that every other field is reachable from both.

Flatten rule: a field whose value is itself a settings dataclass (trading's ``session``) is
marked ``flatten=True``; its fields become flags of the outer command (``--ping-interval`` sets
``session.ping_interval_s``), so the CLI stays one flat list while the process keeps its nested
type. A nested type this project does not own (``BackoffPolicy``) gets its fields' metadata from
the outer field's ``flatten={name: setting(...)}``; its fields not listed there keep their
defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable, Mapping
from types import NoneType, UnionType
from typing import Any

# the default of ``flag``/``toml`` in :func:`setting`: derived from the field's name
DERIVED = "<derived>"

_SYMBOL_RE = re.compile(r"[A-Z0-9]{2,20}")  # fullmatch: "$" would accept a trailing newline
_SHM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")  # as pipeline.shm, fullmatch


class ConfigError(ValueError):
    """A configuration problem, the project's one error type for bad settings.

    ``key`` names the offending setting as the user wrote it: a dotted TOML key
    (``ingest.symbols[1]``) or a flag (``--ring-capacity``); ``source`` says where the value came
    from (a file, ``env VAR``), when known.
    """

    def __init__(self, key: str, problem: str, source: str = "") -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"{key}: {problem}{where}")

    @property
    def field(self) -> str:
        """The flag or key at fault (the name ingest's former error type used)."""
        return self.key


def setting(
    doc: str,
    *,
    flag: str | None = DERIVED,
    no_flag: str = "",
    toml: str | None = DERIVED,
    no_toml: str = "",
    parse: Callable[[str], Any] | None = None,
    show: Callable[[Any], str] | None = None,
    from_toml: Callable[[Any], Any] | None = None,
    run_default: Any = dataclasses.MISSING,
    metavar: str | None = None,
    arg_type: Callable[[str], Any] | None = None,
    required: bool = False,
    flatten: bool | Mapping[str, Mapping[str, Any]] = False,
    **checks: Any,
) -> dict[str, Any]:
    """Field metadata: what the setting means and where it can be set.

    ``flag``: the CLI flag (default ``--field-name``); None with ``no_flag`` saying why not.
    ``toml``: the dotted TOML key (default ``<section>.<field>``, or another section's key whose
    value this field takes, e.g. ``ring.name``); None with ``no_toml`` saying why not.
    ``parse``/``show``: CLI text -> value and back (lists default to comma-separated).
    ``from_toml``: turns the TOML value into the field's (a shared key feeding a derived value).
    ``run_default``: the value `pipeline run` uses when the TOML leaves the key out (the local
    simulator demo), where it differs from the process's own default.
    ``arg_type``: argparse's ``type=`` (a bad value is a usage error naming the flag, as before
    a flag was generated). ``required``: the flag must be given.
    ``flatten``: the value is a dataclass whose fields are flags of their own (module docstring).
    ``checks``: TOML-side rules (min, max, choices, each_choices (a tuple, or a function giving
    one, so a process's parser need not import the table), symbols, shm_name, url,
    power_of_two); ``choices`` also become the flag's argparse choices.
    """
    if flag is None and not no_flag:
        raise ValueError(f"{doc!r}: a setting without a flag must say why (no_flag=...)")
    if toml is None and not no_toml:
        raise ValueError(f"{doc!r}: a setting without a TOML key must say why (no_toml=...)")
    meta: dict[str, Any] = {"doc": doc, "flag": flag, "toml": toml, **checks}
    for name, value in (("no_flag", no_flag), ("no_toml", no_toml), ("parse", parse),
                        ("show", show), ("from_toml", from_toml), ("metavar", metavar),
                        ("arg_type", arg_type), ("required", required), ("flatten", flatten)):
        if value:
            meta[name] = value
    if run_default is not dataclasses.MISSING:
        meta["run_default"] = run_default
    return meta


def csv(text: str) -> list[str]:
    """A comma-separated flag value as a list (blanks dropped)."""
    return [x.strip() for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------------------
# where each field lives


def flag_of(f: dataclasses.Field[Any]) -> str | None:
    """The CLI flag of field ``f`` (None: not on the command line)."""
    flag = f.metadata.get("flag", DERIVED)
    return "--" + f.name.replace("_", "-") if flag == DERIVED else flag


def toml_key_of(section: str, f: dataclasses.Field[Any]) -> str | None:
    """The dotted TOML key of field ``f`` of ``[section]`` (None: not in the TOML)."""
    key = f.metadata.get("toml", DERIVED)
    return f"{section}.{f.name}" if key == DERIVED else key


def own_keys(section: str, cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The keys ``[section]`` accepts (key -> field): fields whose TOML home is this section.
    A key may differ from its field's name (trading's ``wsapi_url`` is the field ``url``)."""
    out: dict[str, dataclasses.Field[Any]] = {}
    for f in dataclasses.fields(cls):
        home, _, key = (toml_key_of(section, f) or "").partition(".")
        if home == section:
            out[key] = f
    return out


def default_of(f: dataclasses.Field[Any], for_run: bool = False) -> Any:
    """The field's default value (``for_run``: the `pipeline run` default when it differs)."""
    if for_run and "run_default" in f.metadata:
        value = f.metadata["run_default"]
        return list(value) if isinstance(value, list) else value
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# ---------------------------------------------------------------------------------------------
# TOML/env: coercion and checks (errors name the dotted key)


def _optional_of(tp: Any) -> Any:
    """``X`` for ``X | None``, else None."""
    if isinstance(tp, UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not NoneType]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def coerce(key: str, tp: Any, value: Any, source: str) -> Any:
    """Turn a TOML value (or an env string, already split) into ``tp``, or raise naming ``key``."""
    inner = _optional_of(tp)
    if inner is not None:
        return coerce(key, inner, value, source)
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        raise ConfigError(key, f"expected a boolean, got {value!r}", source)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}", source)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""), 0)
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {value!r}", source)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}", source)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}", source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}", source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # env form
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}", source)
        return [coerce(f"{key}[{i}]", item_tp, v, source) for i, v in enumerate(value)]
    if origin is dict:
        _k_tp, v_tp = typing.get_args(tp)
        if isinstance(value, str):  # env form: K=V,K=V
            parsed: dict[str, str] = {}
            for part in (p.strip() for p in value.split(",")):
                if not part:
                    continue
                name, sep, val = part.partition("=")
                if not sep or not name.strip():
                    raise ConfigError(key, f"expected NAME=VALUE pairs, got {part!r}", source)
                parsed[name.strip()] = val.strip()
            value = parsed
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}", source)
        return {str(k): coerce(f"{key}.{k}", v_tp, v, source) for k, v in value.items()}
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(key, f"unsupported type {name}", source)  # pragma: no cover


def check(key: str, meta: Mapping[str, Any], value: Any, source: str) -> None:
    """Apply a field's TOML-side rules; errors name the key (and the item, for lists/tables)."""

    def bounds(k: str, v: Any, lo: Any, hi: Any) -> None:
        if lo is not None and v < lo:
            raise ConfigError(k, f"must be >= {lo}, got {v!r}", source)
        if hi is not None and v > hi:
            raise ConfigError(k, f"must be <= {hi}, got {v!r}", source)

    if isinstance(value, int | float) and not isinstance(value, bool):
        bounds(key, value, meta.get("min"), meta.get("max"))
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(meta["choices"])
        raise ConfigError(key, f"must be one of {allowed}; got {value!r}", source)
    if "each_choices" in meta:
        each = meta["each_choices"]
        each = each() if callable(each) else each  # lazy: a table its module owns
        for i, v in enumerate(value):
            if v not in each:
                allowed = ", ".join(each)
                raise ConfigError(f"{key}[{i}]", f"must be one of {allowed}; got {v!r}", source)
    if "each_min" in meta and isinstance(value, dict):
        for k, v in value.items():
            bounds(f"{key}.{k}", v, meta["each_min"], None)
    if meta.get("symbols"):
        if not value:
            raise ConfigError(key, "must list at least one symbol", source)
        for i, v in enumerate(value):
            if not isinstance(v, str) or not v.isascii() or not _SYMBOL_RE.fullmatch(v.upper()):
                raise ConfigError(f"{key}[{i}]", f"not a symbol like BTCUSDT or btcusdt: {v!r}",
                                  source)
        value = [v.upper() for v in value]
        if len(set(value)) != len(value):
            raise ConfigError(key, "duplicate symbols", source)
    if meta.get("power_of_two") and value & (value - 1):
        raise ConfigError(key, f"must be a power of two, got {value}", source)
    if meta.get("shm_name") and not _SHM_NAME_RE.fullmatch(value):
        raise ConfigError(key, f"not a valid shared-memory name: {value!r}", source)
    if meta.get("url") and value and not re.match(r"^(wss?|https?)://[^\s/]+", value):
        raise ConfigError(key, f"expected a ws(s):// or http(s):// URL: {value!r}", source)


def build_section(section: str, cls: type, raw: Mapping[str, tuple[Any, str]]) -> Any:
    """``cls`` from ``{key: (value, source)}`` of ``[section]``; unknown keys are errors.

    Keys left out take the field's `pipeline run` default (:func:`setting`'s ``run_default``),
    else the process's own default.
    """
    hints = typing.get_type_hints(cls)
    fields = own_keys(section, cls)
    kwargs: dict[str, Any] = {}
    for f in fields.values():
        if "run_default" in f.metadata:
            value = default_of(f, for_run=True)
            kwargs[f.name] = (
                f.metadata["from_toml"](value) if "from_toml" in f.metadata else value
            )
    for key, (value, source) in raw.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(dotted, f"unknown key (known: {known})", source)
        name = fields[key].name
        coerced = coerce(dotted, hints[name], value, source)
        meta = fields[key].metadata
        check(dotted, meta, coerced, source)
        if meta.get("symbols"):  # in any case, as Binance's own stream names are lower case
            coerced = [v.upper() for v in coerced]
        kwargs[name] = meta["from_toml"](coerced) if "from_toml" in meta else coerced
    return cls(**kwargs)


def translate_error(section: str, cls: type, exc: ConfigError) -> ConfigError:
    """A process's own check failed on a TOML-built config: name the TOML key, not the flag."""
    for f in dataclasses.fields(cls):
        if flag_of(f) == exc.key:
            key = toml_key_of(section, f)
            if key is not None:
                return ConfigError(key, exc.problem, exc.source)
    return exc


# ---------------------------------------------------------------------------------------------
# command line: flags from the fields, and the fields back from the parsed flags


def _cli_type(tp: Any) -> Any:
    inner = _optional_of(tp)
    tp = inner if inner is not None else tp
    return tp if tp in (int, float) else None


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One flag-level setting: a field of ``cls``, or of a flattened field's nested type."""

    path: tuple[str, ...]  # attribute path from the outer config (("session", "ping_interval_s"))
    field: dataclasses.Field[Any]
    meta: Mapping[str, Any]
    hint: Any

    @property
    def dest(self) -> str:
        """The argparse destination: the field's name at top level (what callers read)."""
        return ".".join(self.path)


def _leaves(cls: type, prefix: tuple[str, ...] = (),
            overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[_Leaf]:
    """The flag-level settings of ``cls`` in field order, flattened fields expanded."""
    hints = typing.get_type_hints(cls)
    out: list[_Leaf] = []
    for f in dataclasses.fields(cls):
        if overrides is not None:
            if f.name not in overrides:
                continue  # a foreign type's field the outer field does not expose
            meta: Mapping[str, Any] = overrides[f.name]
        else:
            meta = f.metadata
        flat = meta.get("flatten")
        if flat:
            sub = flat if isinstance(flat, Mapping) else None
            out += _leaves(hints[f.name], (*prefix, f.name), sub)
        else:
            out.append(_Leaf((*prefix, f.name), f, meta, hints[f.name]))
    return out


def _leaf_flag(leaf: _Leaf) -> str | None:
    flag = leaf.meta.get("flag", DERIVED)
    return "--" + leaf.field.name.replace("_", "-") if flag == DERIVED else flag


def _leaf_default(leaf: _Leaf, root: type) -> Any:
    value: Any = None
    for i, name in enumerate(leaf.path):
        if i == 0:
            f = next(x for x in dataclasses.fields(root) if x.name == name)
            value = default_of(f)
        else:
            value = getattr(value, name)
    return value


def _is_text(leaf: _Leaf) -> bool:
    """Taken as text by argparse and turned into a value by :func:`values_from_args`."""
    return "arg_type" not in leaf.meta and (
        "parse" in leaf.meta or typing.get_origin(leaf.hint) in (list, tuple)
    )


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: frozenset[str] = frozenset()
) -> None:
    """One flag per field of ``cls`` that has one, in field order, default = the field's default.

    Lists are comma-separated text and fields with ``parse`` take text: both are turned into
    values by :func:`values_from_args`, after argparse, so their errors read as the process's.
    Booleans are ``--flag``/``--no-flag``; flattened fields add their nested fields' flags.
    """
    for leaf in _leaves(cls):
        flag = _leaf_flag(leaf)
        if flag is None or leaf.path[0] in skip:
            continue
        default = _leaf_default(leaf, cls)
        meta = leaf.meta
        kwargs: dict[str, Any] = {"dest": leaf.dest, "help": meta["doc"]}
        if leaf.hint is bool:
            kwargs["default"] = default
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_text(leaf):
            kwargs["default"] = None if default is None else show_value(leaf.field, default, meta)
        else:
            kwargs["default"] = default
            if "arg_type" in meta:
                kwargs["type"] = meta["arg_type"]
            elif _cli_type(leaf.hint) is not None:
                kwargs["type"] = _cli_type(leaf.hint)
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        elif len(leaf.path) > 1 and leaf.hint is not bool and "choices" not in meta:
            kwargs["metavar"] = leaf.field.name.upper()  # not the dotted dest
        if meta.get("required"):
            kwargs["required"] = True
        parser.add_argument(flag, **kwargs)


def values_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` for every flagged field of ``cls`` in ``args`` (as added by
    :func:`add_arguments`); text is parsed here (ValueError names the flag). A flattened field
    is its default with the nested flags applied (its type's own checks may raise ValueError)."""
    out: dict[str, Any] = {}
    nested: dict[tuple[str, ...], dict[str, Any]] = {}
    for leaf in _leaves(cls):
        if _leaf_flag(leaf) is None or not hasattr(args, leaf.dest):
            continue
        value = getattr(args, leaf.dest)
        if value is not None and _is_text(leaf):
            if "parse" in leaf.meta:
                value = leaf.meta["parse"](value)
            else:
                value = csv(value)
                if typing.get_origin(leaf.hint) is tuple:
                    value = tuple(value)
        if len(leaf.path) == 1:
            out[leaf.path[0]] = value
        else:
            nested.setdefault(leaf.path[:-1], {})[leaf.path[-1]] = value
    # build the nested values innermost first, each from its default plus its flags
    for path in sorted(nested, key=len, reverse=True):
        parent, name = path[:-1], path[-1]
        holder: Any = out if not parent else nested.setdefault(parent, {})
        base = _leaf_default(_Leaf(path, dataclasses.fields(cls)[0], {}, None), cls)
        holder[name] = dataclasses.replace(base, **nested[path])
    return out


def show_value(
    f: dataclasses.Field[Any], value: Any, meta: Mapping[str, Any] | None = None
) -> str:
    """The flag text for ``value`` of field ``f`` (the inverse of its parsing)."""
    meta = f.metadata if meta is None else meta
    if "show" in meta:
        return str(meta["show"](value))
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)  # exact: parses back to the same float
    return str(value)


def to_argv(config: Any) -> list[str]:
    """Flags that rebuild ``config`` from the process's defaults: every flagged field whose
    value differs from its default (None never does: it is the "unset" of optional flags)."""
    argv: list[str] = []
    for leaf in _leaves(type(config)):
        flag = _leaf_flag(leaf)
        value = config
        for name in leaf.path:
            value = getattr(value, name)
        if flag is None or value is None or value == _leaf_default(leaf, type(config)):
            continue
        if leaf.hint is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, show_value(leaf.field, value, leaf.meta)]
    return argv


Reach = tuple[str, str | None, str | None, Mapping[str, Any]]


def reachable(cls: type, section: str) -> list[Reach]:
    """``(dotted path, flag, TOML key, metadata)`` of every flag-level setting of ``cls``
    (flattened fields expanded): what the reachable-or-says-why tests walk. A nested field has
    no TOML key of its own: the flattened field's ``no_toml`` says why."""
    out: list[Reach] = []
    top = {f.name: f for f in dataclasses.fields(cls)}
    for leaf in _leaves(cls):
        meta = leaf.meta
        key = meta.get("toml", DERIVED)
        if len(leaf.path) > 1:
            key = None
            meta = {**meta, "no_toml": top[leaf.path[0]].metadata.get("no_toml", "")}
        elif key == DERIVED:
            key = f"{section}.{leaf.field.name}"
        out.append((leaf.dest, _leaf_flag(leaf), key, meta))
    return out


__all__ = [
    "ConfigError",
    "add_arguments",
    "build_section",
    "check",
    "coerce",
    "csv",
    "default_of",
    "flag_of",
    "own_keys",
    "reachable",
    "setting",
    "show_value",
    "to_argv",
    "toml_key_of",
    "translate_error",
    "values_from_args",
]
