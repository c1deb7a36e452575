"""Reading a `showo` command line the way the user meant it.

click (under typer) has no option that takes a variable number of values (argparse's `nargs="+"`),
and a word it cannot place after a switch silently becomes one more positional. With commands whose
positionals are lists of prompts that turned slips into extra work: `showo generate "a corgi" --seed
1 2` painted a second image of the prompt "2", and `--greedy true` one of the prompt "true".

Rather than replace click's parser, every showo command rewrites its argument list first
(`ShowoCommand.parse_args` → `normalize_args`), using the command's own option table, so the rules
hold for every command, including ones registered later:

* mflux's `--seed 1 2 3` (integers after one `--seed`) becomes `--seed 1 --seed 2 --seed 3`; the
  repeated and comma forms work as before. On a command that takes a single seed, a second integer
  after `--seed N` is refused with a hint instead of becoming a positional.
* `true`/`false` (yes/no/on/off) right after a switch is refused with a hint: switches take no value.
* Old spellings still work for one release, with a note: `-q BITS` → `-q --q-bits BITS`,
  `--group-size` → `--q-group-size`, `--head-bits` → `--q-head-bits`.
* `-m` is mlx-lm's `--max-tokens` (ask, caption, complete); `--model` has no short form. An old
  `-m MODEL` gets a one-line error naming `--model`.
* Arguments that are not valid UTF-8 (the shell passed raw bytes) are refused in one line.

Everything after `--` is passed through untouched: that is how to give a prompt such as "2" or
"true" (`showo generate --seed 1 -- 2`).

`ShowoCommand` also shows usage lines in capitals (`PROMPT...`) and no `<bool>` type for switches;
`ShowoGroup` gives every registered command those conventions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from typer.core import TyperCommand, TyperGroup

from .errors import ShowoError

SEED_VALUES = re.compile(r"^-?\d+(,-?\d+)*,?$")  # 7, -1 (refused later with the range), 1,2,3
INTEGER = re.compile(r"^[+-]?\d+$")
BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off"}
QUANTIZE_SWITCH = ("-q", "--quantize")
RENAMED = {"--group-size": "--q-group-size", "--head-bits": "--q-head-bits"}  # old bench spellings
MAX_TOKENS_SHORT = "-m"


class ArgumentError(ShowoError):
    """A command line that click would misread (stray value, old spelling, bad encoding)."""


@dataclass
class OptionTable:
    """What normalize_args needs to know about one command's options."""

    switches: set[str] = field(default_factory=set)  # take no value
    valued: set[str] = field(default_factory=set)  # take exactly one value
    seed: set[str] = field(default_factory=set)  # the names of the seed option
    many_seeds: bool = False  # the seed option is repeatable (one image per seed)

    @property
    def names(self) -> set[str]:
        return self.switches | self.valued | self.seed

    @classmethod
    def of(cls, params: Iterable[Any]) -> "OptionTable":
        table = cls()
        for p in params:
            if getattr(p, "param_type_name", "") != "option":
                continue
            names = [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
            if p.name == "seed":
                table.seed.update(names)
                table.many_seeds = bool(getattr(p, "multiple", False))
            elif getattr(p, "is_flag", False) or getattr(p, "count", False):
                table.switches.update(names)
            else:
                table.valued.update(names)
        return table


def check_utf8(args: Sequence[str]) -> None:
    """Refuse arguments the shell passed as bytes that are not UTF-8 (Python keeps them as lone
    surrogates, which would fail much later, mid-run, when printed or tokenized)."""
    for i, a in enumerate(args, 1):
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            try:
                raw = a.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raw = a.encode("utf-8", "backslashreplace")
            shown = repr(raw[:40])[2:-1] + ("…" if len(raw) > 40 else "")
            raise ArgumentError(f"argument {i} ('{shown}') is not valid UTF-8 text; retype it or set a UTF-8 locale") from None


def _split(arg: str, table: OptionTable) -> tuple[str, str | None]:
    """`--name=value` / `-sVALUE` → (option name, attached value); anything else → (arg, None)."""
    if arg.startswith("--") and "=" in arg:
        name, value = arg.split("=", 1)
        return name, value
    if len(arg) > 2 and arg[0] == "-" and arg[1] != "-" and arg[:2] in table.seed:
        return arg[:2], arg[2:]
    return arg, None


def normalize_args(args: Sequence[str], table: OptionTable, note: Callable[[str], None] = lambda m: None) -> list[str]:
    """`args` rewritten as described in the module docstring (ArgumentError for the refused forms)."""
    check_utf8(args)
    out: list[str] = []
    i, n = 0, len(args)
    while i < n:
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        name, attached = _split(arg, table)
        i += 1
        nxt = args[i] if i < n else None
        if name in QUANTIZE_SWITCH and name in table.switches and attached is None and nxt is not None and INTEGER.match(nxt):
            note(f"`{name} {nxt}` is deprecated (removed in the next release): -q is a switch now; write `-q --q-bits {nxt}`")
            out += [name, "--q-bits", nxt]
            i += 1
            continue
        if name in RENAMED and name not in table.names and RENAMED[name] in table.names:
            note(f"{name} is deprecated (removed in the next release); write {RENAMED[name]}")
            name = RENAMED[name]
            arg = name if attached is None else f"{name}={attached}"
        if name in table.seed:
            i = _seeds(args, i, name, attached, table, out)
        elif name in table.switches:
            out.append(arg)
            if attached is None and nxt is not None and nxt.lower() in BOOLEAN_WORDS:
                raise ArgumentError(
                    f"{name} is a switch and takes no value: drop {nxt!r} (give {name} to turn it on, leave it out "
                    f"for off); a prompt {nxt!r} goes after `--`"
                )
        elif name in table.valued:
            out.append(arg)
            if attached is None and nxt is not None:
                if name == MAX_TOKENS_SHORT and not INTEGER.match(nxt):
                    raise ArgumentError(f"-m is --max-tokens (as in mlx-lm) and takes a number, got {nxt!r}; "
                                        f"the model is given with --model {nxt}")
                out.append(nxt)
                i += 1
        elif name == MAX_TOKENS_SHORT:
            raise ArgumentError("-m is not an option here: the model is given with --model (long form only; "
                                "-m is mlx-lm's --max-tokens on ask, caption and complete)")
        else:
            out.append(arg)
    return out


def _seeds(args: Sequence[str], i: int, name: str, attached: str | None, table: OptionTable, out: list[str]) -> int:
    """Copy `--seed V [V ...]` into `out` as repeated options; return the index after them."""
    if attached is None:
        if i >= len(args):
            out.append(name)  # click reports the missing value
            return i
        attached, i = args[i], i + 1
    out += [name, attached]
    while i < len(args) and SEED_VALUES.match(args[i]):
        if not table.many_seeds:
            raise ArgumentError(
                f"this command takes one --seed; {args[i]!r} after `{name} {attached}` is not a second seed "
                f"(a text that is a number goes before the options or after `--`)"
            )
        out += [name, args[i]]
        i += 1
    return i


# -- the click layer ---------------------------------------------------------------------------------
def untyped_switches(params: list) -> list:
    """Switches take no value, so their help shows no type (recent typer would print `<bool>`)."""
    for p in params:
        if getattr(p, "is_flag", False) and getattr(p, "metavar", None) is None:
            p.metavar = ""
    return params


class ShowoCommand(TyperCommand):
    """A typer command with showo's command-line conventions (see the module docstring)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        from .cli_common import fail, say

        try:
            args = normalize_args(args, OptionTable.of(self.get_params(ctx)), note=lambda m: say(f"note: {m}"))
        except ShowoError as e:
            fail(str(e))
        return super().parse_args(ctx, args)

    def get_params(self, ctx) -> list:
        return untyped_switches(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        """`[OPTIONS] IMAGE [PROMPT]...`: positionals in capitals, optional ones in brackets."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if getattr(p, "param_type_name", "") != "argument":
                continue
            name = (p.metavar or p.name or "").upper()
            name = name if p.required else f"[{name}]"
            pieces.append(name + ("..." if p.nargs != 1 else ""))
        return pieces


def adopt(command: Any) -> Any:
    """Give a plain typer command showo's conventions. Commands are registered from several modules
    (`register(app)`), so the group converts them instead of every module passing `cls=`; the
    subclass adds methods only, so changing the instance's class is safe."""
    if type(command) is TyperCommand:
        command.__class__ = ShowoCommand
    return command


class ShowoGroup(TyperGroup):
    """The `showo` group: every subcommand follows ShowoCommand's conventions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            adopt(command)

    def get_params(self, ctx) -> list:
        return untyped_switches(super().get_params(ctx))

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        from .cli_common import fail

        try:
            check_utf8(args)
        except ShowoError as e:
            fail(str(e))
        return super().parse_args(ctx, args)
