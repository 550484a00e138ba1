"""Command lines generated from typed config dataclasses: one builder for every entry point.

    @dataclass
    class OptimConfig:
        \"\"\"Optimizer and schedule.\"\"\"
        lr: float = config_field(1e-5, "Peak learning rate.")

    @dataclass
    class TrainConfig:
        optim: OptimConfig = section(OptimConfig)

    cfg = parse_config(TrainConfig, argv, prog="python -m llm2clip.train", description="...")

Every leaf field becomes one ``--flag-name`` carrying the field's help and default (bool: --x /
--no-x; tuple or list: nargs; int, float, str and Optional of those: typed; extra argparse
keywords such as nargs, const, choices, required or action ride in the field's metadata, ``flag``
renames the option). A field whose type is a dataclass is a section: its flags form one help group
(titled with the section's docstring) and parse into that section's instance, so each component
is handed its own section. Flag names are unique across sections; the tree validates itself in
the dataclasses' ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Any, TypeVar

__all__ = ["build_parser", "config_field", "parse_config", "section"]

C = TypeVar("C")


def config_field(default, help: str, **argparse_kw):
    """A dataclass field carrying its CLI help and any extra argparse keywords."""
    meta = {"help": help, **argparse_kw}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A config section: a nested dataclass built from its own flags (default: its defaults)."""
    return field(default_factory=cls, metadata={"section": True})


def _is_section(kind) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _argument(f: dataclasses.Field, kind) -> tuple[list[str], dict]:
    meta = dict(f.metadata)
    flags = [meta.pop("flag", "--" + f.name.replace("_", "-"))]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kw = {"help": meta.pop("help"), "default": default}
    if "action" in meta:
        pass
    elif kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) in (tuple, list):
        kw.update(nargs="+" if default else "*", type=str)
    elif kind in (int, float, str):
        kw["type"] = kind
    else:  # Optional[...]: the first non-None member
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kw["type"] = args[0] if args and args[0] in (int, float, str) else str
    kw.update(meta)
    return flags, kw


def _add(parser, group, config_cls: type, prefix: str, seen: dict[str, str]) -> None:
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        if _is_section(kind):
            doc = (kind.__doc__ or f.name).strip().splitlines()[0]
            _add(parser, parser.add_argument_group(f.name, doc), kind, f"{prefix}{f.name}.", seen)
            continue
        flags, kw = _argument(f, kind)
        for flag in flags:
            if flag in seen:
                raise TypeError(f"{flag} is defined by both {seen[flag]} and {prefix}{f.name}")
            seen[flag] = prefix + f.name
        group.add_argument(*flags, dest=prefix + f.name, **kw)


def build_parser(config_cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per leaf field of `config_cls` and of its sections, see the module docstring."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _add(p, p, config_cls, "", {})
    return p


def _build(config_cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    hints = typing.get_type_hints(config_cls)
    kw = {}
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        kw[f.name] = (
            _build(kind, values, f"{prefix}{f.name}.") if _is_section(kind) else values[prefix + f.name]
        )
    return config_cls(**kw)


def parse_config(config_cls: type[C], argv: Sequence[str] | None, prog: str, description: str = "") -> C:
    """Parse `argv` into a validated `config_cls` (sections included)."""
    args = build_parser(config_cls, prog, description).parse_args(argv)
    return _build(config_cls, vars(args))
