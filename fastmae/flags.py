"""The flags of every command, read from its config dataclass as tyro names them, and a command line checked
against them before tyro parses it: a malformed line is one message naming the flag, the problem and the fix.

tyro's flag names with `use_underscores=True`: a field `f` of section `s` is `--s.f`; a bool is `--s.f` /
`--s.no_f`; a tuple of fixed length takes that many values, `tuple[X, ...]` any number; `Literal` fields take one
of their values; `bool | None` takes None, True or False. Nothing here reads tyro's output.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import tyro

SUPPRESS = typing.get_args(tyro.conf.Suppress[int])[1]  # the marker tyro.conf.Suppress adds


@dataclass(frozen=True)
class Flag:
    """One flag: how many values it takes (-1 = any number), their type ('int', 'float', 'str') and choices."""

    name: str
    nargs: int
    kind: str = "str"
    choices: tuple = ()
    required: bool = False


def _leaf(name: str, hint, required: bool) -> list[Flag]:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if hint is bool:
        head, _, leaf = name.rpartition(".")
        return [Flag(name, 0), Flag(f"{head}.no_{leaf}" if head else f"--no_{leaf[2:]}", 0)]
    if origin in (typing.Union, types.UnionType) and set(args) == {bool, type(None)}:
        return [Flag(name, 1, "str", ("None", "True", "False"), required)]
    if origin is typing.Literal:
        return [Flag(name, 1, "str", tuple(str(a) for a in args), required)]
    if origin is tuple:
        inner = args[0]
        choices = tuple(str(a) for a in typing.get_args(inner)) if typing.get_origin(inner) is typing.Literal else ()
        kind = inner.__name__ if inner in (int, float) else "str"
        return [Flag(name, -1 if len(args) == 2 and args[1] is Ellipsis else len(args), kind, choices, required)]
    return [Flag(name, 1, hint.__name__ if hint in (int, float) else "str", (), required)]


def _suppressed(hint) -> bool:
    """Whether a field is hidden from the command line (`tyro.conf.Suppress[...]`: a field a command does not use)."""
    return typing.get_origin(hint) is typing.Annotated and any(m is SUPPRESS for m in hint.__metadata__)


def command_flags(cls: type, prefix: str = "--") -> dict[str, Flag]:
    """Every flag of a config dataclass (nested sections included), by name."""
    hints = typing.get_type_hints(cls, include_extras=True)
    flags: dict[str, Flag] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if _suppressed(hint):
            continue
        if typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(hint):
            flags.update(command_flags(hint, f"{prefix}{f.name}."))
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        flags.update({fl.name: fl for fl in _leaf(prefix + f.name, hint, required)})
    return flags


def _suggest(flag: str, command: str, flags: Mapping[str, Mapping[str, Flag]]) -> str:
    """'; did you mean --x or --y (finetune, segment)?' from the flags of this command first, then of the others."""
    own = list(flags[command])
    names = difflib.get_close_matches(flag, own, n=2, cutoff=0.8)
    others = sorted({n for fl in flags.values() for n in fl} - set(own))
    names += difflib.get_close_matches(flag, others, n=2 if not names else 1, cutoff=0.8)
    if flag in others and flag not in names:
        names.insert(0, flag)
    if not names:
        return ""
    named = [n if n in flags[command] else f"{n} ({', '.join(c for c in flags if n in flags[c])})" for n in names[:3]]
    return f"; did you mean {' or '.join(named)}?"


def _type_error(flag: Flag, value: str) -> str:
    """What is wrong with one value of `flag` ('' when it fits)."""
    if flag.choices and value not in flag.choices:
        return f"invalid choice {value!r} for argument {flag.name!r}. Expected one of {flag.choices}"
    try:
        {"int": int, "float": float}.get(flag.kind, str)(value)
    except ValueError:
        what = "an integer" if flag.kind == "int" else "a number"
        return f"{flag.name} takes {what}, got {value!r}"
    return ""


def _values_text(flag: Flag) -> str:
    one = flag.kind.upper() if flag.kind in ("int", "float") else "VALUE"
    return f"{flag.nargs} value{'s' if flag.nargs != 1 else ''} ({' '.join([one] * flag.nargs)})"


def check_args(command: str, args: Sequence[str], flags: Mapping[str, Mapping[str, Flag]]) -> str:
    """The problem with a command's arguments (after the command name), '' when tyro will accept them."""
    own = flags[command]
    see = f"; see `fastmae {command} --help`"
    given: set[str] = set()
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            before = f" after {args[i - 1]}, which takes no value" if i and args[i - 1] in own and not own[args[i - 1]].nargs else ""
            return f"unexpected argument {token!r}{before}: fastmae {command} takes --flags only{see}"
        name, eq, inline = token.partition("=")
        if name not in own:
            return f"unrecognized option {name}{_suggest(name, command, flags)}{see}"
        flag = own[name]
        given.add(name)
        values = [inline] if eq else []
        i += 1
        if not eq:
            while i < len(args) and not args[i].startswith("--") and (flag.nargs < 0 or len(values) < flag.nargs):
                values.append(args[i])
                i += 1
        if flag.nargs == 0 and eq:
            return f"{name} takes no value, got {inline!r}; give it alone to switch it on{see}"
        if flag.nargs > 0 and len(values) != flag.nargs:
            got = f"got {len(values)}" + (f": {' '.join(values)}" if values else "")
            return f"Missing value for argument {name!r}: it takes {_values_text(flag)}, {got}{see}"
        for value in values:
            problem = _type_error(flag, value)
            if problem:
                return problem + see
    missing = [n for n, fl in own.items() if fl.required and n not in given]
    if missing:
        return f"missing required {', '.join(missing)}{see}"
    return ""


def check_command_line(args: Sequence[str], commands: Mapping[str, type]) -> str:
    """The problem with a whole `fastmae ...` command line, '' when tyro will accept it."""
    names = ", ".join(commands)
    if not args or args[0].startswith("-"):
        return f"no command given; available subcommands: {names}; see `fastmae --help`"
    if args[0] not in commands:
        close = difflib.get_close_matches(args[0], list(commands), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown command {args[0]!r}; {hint}available subcommands: {names}; see `fastmae --help`"
    flags = {name: command_flags(cls) for name, cls in commands.items()}
    return check_args(args[0], args[1:], flags)

