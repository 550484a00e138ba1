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
--no-x; tuple or list: nargs; int, float (finite only), str and Optional of those: typed; extra argparse
keywords such as nargs, const, choices, required or action ride in the field's metadata, ``flag``
renames the option; ``internal`` marks a field set by the program, recorded but not a flag). A field
whose type is a dataclass is a section: its flags form one help group
(titled with the section's docstring) and parse into that section's instance, so each component
is handed its own section. Flag names are unique across sections; the tree validates itself in
the dataclasses' ``__post_init__``.

Entry points run through :func:`run`: a user error (a bad flag or path, a refused cache, a stale
resume) prints one line naming the problem and exits 2, a run that stops on its own checks (a
non-finite step, too many skipped samples) prints one line and exits 1; ``--debug`` or
``LLM2CLIP_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import traceback
import typing
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any, TypeVar

__all__ = [
    "UsageError",
    "build_parser",
    "config_field",
    "finite_float",
    "parse_config",
    "require_finite",
    "run",
    "section",
]

C = TypeVar("C")


class UsageError(ValueError):
    """A user error: a bad flag value, path or combination, a refused input. One line, exit 2."""


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def require_finite(config) -> None:
    """ValueError naming the first float field of a config dataclass that is NaN or infinite (a
    NaN passes every `<=` range check, so configs call this before their range checks)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


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
        kw["type"] = finite_float if kind is float else kind
    else:  # Optional[...]: the first non-None member
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        first = args[0] if args and args[0] in (int, float, str) else str
        kw["type"] = finite_float if first is float else first
    if "action" not in kw and "action" not in meta and "choices" not in meta:
        kw["metavar"] = flags[0].lstrip("-").replace("-", "_").upper()  # not a section's dotted dest
    kw.update(meta)
    return flags, kw


def _add(parser, group, config_cls: type, prefix: str, seen: dict[str, str]) -> None:
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        if f.metadata.get("internal"):  # set by the program, recorded in the config, not a flag
            continue
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, exit 2 (argparse would print the whole usage block first)."""
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def build_parser(config_cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per leaf field of `config_cls` and of its sections, see the module docstring."""
    p = _Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add(p, p, config_cls, "", {})
    return p


def _build(config_cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    hints = typing.get_type_hints(config_cls)
    kw = {}
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        if f.metadata.get("internal"):
            continue
        kw[f.name] = (
            _build(kind, values, f"{prefix}{f.name}.") if _is_section(kind) else values[prefix + f.name]
        )
    return config_cls(**kw)


def parse_config(
    config_cls: type[C],
    argv: Sequence[str] | None,
    prog: str,
    description: str = "",
    defaults: dict[str, Any] | None = None,
) -> C:
    """Parse `argv` into a validated `config_cls` (sections included); a value the config refuses
    raises UsageError (a malformed flag exits 2 in argparse itself). defaults: {dotted field path:
    value} replacing the fields' own defaults (a recipe); flags given in argv still win."""
    parser = build_parser(config_cls, prog, description)
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    try:
        return _build(config_cls, vars(args))
    except UsageError:
        raise
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e


def _expected_failures() -> tuple[tuple, tuple]:
    """(user errors: exit 2, runs stopped by their own checks: exit 1)."""
    from llm2clip.cache.format import CacheError
    from llm2clip.data.shards import ShardError
    from llm2clip.data.skips import SkipLimitError

    user = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, CacheError)
    stopped = (FloatingPointError, ShardError, SkipLimitError)
    return user, stopped


def run(main: Callable[[list[str]], object], prog: str, argv: Sequence[str] | None = None) -> None:
    """Run an entry point's main(argv) as a command: expected failures print one line naming the
    problem (exit 2 for user errors, 1 for a stopped run); --debug / LLM2CLIP_DEBUG=1: traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LLM2CLIP_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    user, stopped = _expected_failures()
    try:
        main(argv)
    except (*user, *stopped) as e:
        if debug:
            traceback.print_exc()
        rank = os.environ.get("RANK")
        where = f" [rank {rank}]" if rank not in (None, "0") else ""
        message = str(e).strip() or type(e).__name__
        print(f"{prog}{where}: error: {message}", file=sys.stderr)
        if not debug:
            print(f"{prog}: (--debug or LLM2CLIP_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2 if isinstance(e, user) else 1)
