"""Typed run configurations: one frozen dataclass per recipe, turned into CLI options and JSON.

A recipe's options are the fields of its config dataclass. This module derives everything else from
those fields: the command-line options (``--phantom-steps 5``), their help text (type, default,
allowed values), the error for an unknown option (the list of allowed ones, with the closest
match), conversion to and from ``config.json``, and the checks used in ``__post_init__``.

Supported field types: ``int``, ``float``, ``str``, ``bool`` (``--flag`` / ``--no-flag``),
``Literal[...]`` of strings, and ``tuple[X, ...]`` of those (several values after one option).
A field's help comes from ``dataclasses.field(metadata={"help": ...})``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from equilibria._validate import check_float

C = TypeVar("C")


class ConfigError(ValueError):
    """An option is unknown or has an invalid value; the message lists what is allowed."""


class ConfigTypeError(ConfigError, TypeError):
    """An option's value has the wrong type (a :class:`ConfigError` that is also a TypeError)."""


def option(default: Any, help: str, *, resumable: bool = False) -> Any:
    """A config field with help text.

    Args:
        default: the default value.
        help: one line for ``--help``.
        resumable: the option may differ between a run and its ``--resume`` (run control such as
            ``quiet``); every other option must match the saved config.
    """
    return dataclasses.field(default=default, metadata={"help": help, "resumable": resumable})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(hint: Any) -> str:
    """Readable name of a supported field type, e.g. ``{anderson,picard}`` or ``int``."""
    if typing.get_origin(hint) is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(hint)) + "}"
    if typing.get_origin(hint) is tuple:
        return f"{type_name(typing.get_args(hint)[0])} ..."
    return getattr(hint, "__name__", str(hint))


def describe_options(cls: type) -> str:
    """One line per option: ``--name TYPE (default: X)``; used in error messages."""
    hints = _hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            lines.append(f"  {flag} / --no-{flag[2:]} (default: {'on' if f.default else 'off'})")
        else:
            lines.append(f"  {flag} {type_name(hints[f.name])} (default: {_show(f.default)})")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if isinstance(value, str) and value == "":
        return "''"
    return str(value)


def check_value(cls_name: str, name: str, value: Any, hint: Any) -> Any:
    """Check that ``value`` has the field type ``hint``; ints are accepted for floats.

    Raises:
        ConfigError: naming the option, the value and what is allowed.
    """
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(
                f"{cls_name}: {name} must be one of ({', '.join(map(repr, allowed))}), "
                f"got {value!r}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigTypeError(f"{cls_name}: {name} must be a sequence, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(check_value(cls_name, name, v, item) for v in value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigTypeError(f"{cls_name}: {name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{cls_name}: {name} must be finite, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigTypeError(f"{cls_name}: {name} must be int, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(f"{cls_name}: {name} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigTypeError(f"{cls_name}: {name} must be a string, got {value!r}")
        return value
    raise TypeError(f"{cls_name}.{name}: unsupported config field type {hint!r}")


def check_fields(config: Any) -> None:
    """Type-check every field of a dataclass instance (call first in ``__post_init__``).

    Floats given as ints are converted, lists become tuples.
    """
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = check_value(type(config).__name__, f.name, getattr(config, f.name), hints[f.name])
        object.__setattr__(config, f.name, value)


def check_range(
    config: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    """Raise :class:`ConfigError` unless ``low <= config.name <= high`` (``<`` if ``low_open``).

    The check is :func:`equilibria._validate.check_float` (the core library's); its message
    (option, interval, value) is kept, with the value shown as given (``0``, not ``0.0``).
    """
    value = getattr(config, name)
    try:
        check_float(name, value, low=low, high=high, low_open=low_open, high_open=False)
    except (TypeError, ValueError) as e:
        text = str(e).rsplit(", got ", 1)[0]
        raise ConfigError(f"{type(config).__name__}: {text}, got {value!r}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-ready dict (tuples become lists)."""
    return {
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in dataclasses.fields(config)
    }


def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
    """Build a config from a dict (e.g. a loaded ``config.json``).

    Raises:
        ConfigError: for unknown keys (listing the allowed options) or invalid values.
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(_unknown_message(cls, unknown, names, prefix=""))
    return cls(**values)


def _unknown_message(cls: type, unknown: Sequence[str], names: Sequence[str], prefix: str) -> str:
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, [prefix + n.replace("_", "-") for n in names], 1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (
        f"unknown option(s) for {cls.__name__}: {', '.join(parts)}\n"
        f"allowed options:\n{describe_options(cls)}"
    )


def differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    cls: type,
    saved_defaults: Mapping[str, Any] | None = None,
) -> list[tuple[str, Any, Any]]:
    """Options (not marked ``resumable``) whose value differs between two config dicts.

    ``saved_defaults``: the value of an option that ``saved`` lacks because the recipe gained it
    after the run was saved (a task's ``record_defaults``); an option missing from both is
    reported as ``'<missing>'``.
    """
    fallback = saved_defaults or {}
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("resumable"):
            continue
        a = saved.get(f.name, fallback.get(f.name, "<missing>"))
        b = current.get(f.name, "<missing>")
        if a != b:
            out.append((f.name, a, b))
    return out


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`ConfigError` instead of exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Collection[str] | None = None,
) -> None:
    """Add one ``--option`` per field of ``cls`` (or of the fields named in ``only``); defaults
    are suppressed (only given ones are set)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        hint = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            help_text += f" (default: {'on' if f.default else 'off'})"
        else:
            item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint
            if typing.get_origin(hint) is tuple:
                kwargs["nargs"] = "+"
            if typing.get_origin(item) is Literal:
                kwargs["choices"] = typing.get_args(item)
                kwargs["metavar"] = type_name(item)
            else:
                kwargs["type"] = _converter(f.name, item)
                kwargs["metavar"] = type_name(item).upper()
            if "(default" not in help_text:  # unless the help names the effective default
                help_text += f" (default: {_show(f.default)})"
        kwargs["help"] = help_text.replace("%", "%%")
        parser.add_argument(flag, **kwargs)


def _converter(name: str, item: Any) -> typing.Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return item(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {type_name(item)}, got {text!r}") from None

    convert.__name__ = type_name(item)
    return convert


def refuse_repeats(argv: Iterable[str]) -> None:
    """Raise :class:`ConfigError` if an option is given more than once (argparse would keep the
    last silently); ``--flag`` and ``--no-flag`` count as the same option.

    Raises:
        ConfigError: naming the option and how often it was given.
    """
    seen: dict[str, int] = {}
    for arg in argv:
        if not arg.startswith("--") or arg == "--":
            continue
        flag = arg.split("=", 1)[0]
        flag = "--" + flag[5:] if flag.startswith("--no-") else flag
        seen[flag] = seen.get(flag, 0) + 1
    for flag, count in seen.items():
        if count > 1:
            hint = "give one folder" if flag == "--run-dir" else "give it once"
            raise ConfigError(f"{flag} given {count} times; {hint}")


def parse_options(cls: type[C], argv: Iterable[str], *, prog: str) -> C:
    """Parse ``--option value`` arguments into a config of type ``cls``.

    Raises:
        ConfigError: for an unknown option (with the allowed ones and the closest match), a value
            of the wrong type, or a value that the config's ``__post_init__`` rejects.
    """
    argv = list(argv)
    refuse_repeats(argv)
    parser = OptionParser(prog=prog, add_help=False, allow_abbrev=False)
    add_arguments(parser, cls)
    args, rest = parser.parse_known_args(argv)
    if rest:
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = [r for r in rest if r.startswith("-")] or rest
        raise ConfigError(_unknown_message(cls, unknown, names, prefix="--"))
    try:
        return cls(**vars(args))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a recipe validating with plain ValueError/TypeError
        raise ConfigError(f"{e}\nallowed options:\n{describe_options(cls)}") from None
