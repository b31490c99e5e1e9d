"""The command line of ``fastppo train NAME``: an argparse parser made from a config dataclass,
and for a preset, from the registries (``preset_parser``).

Each field is the flag ``--name`` (``--name-with-dashes`` is accepted too), converted to the field's
type; a bool flag alone means true (``--resume``) and ``--no_name`` means false. ``--help`` has one
short usage line, the flags in sections, and each default once, as the parser's defaults say (a
preset's parser gets the preset's values). Flags in ``hidden`` are accepted but not listed.
A field's metadata: ``help``, and ``choices`` (a function returning the valid values, shown as
the flag's metavar; the config checks them, naming the field in one line).
"""

import argparse
import dataclasses
import textwrap
import types
import typing

from fastppo.trainer import config
from fastppo.trainer.algorithms import ADVANTAGES, POLICY_LOSSES
from fastppo.trainer.errors import UsageError

_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")
_METAVARS = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}


def boolean(text) -> bool:
    """A flag's true or false: yes/no, true/false, t/f, y/n, 1/0 (any case)."""
    if isinstance(text, bool):
        return text
    if str(text).lower() in _TRUE:
        return True
    if str(text).lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def value_type(f: dataclasses.Field) -> type:
    """The type of a field's values: ``float | None`` is float."""
    kind = f.type
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind not in _METAVARS:
        raise TypeError(f"field {f.name}: {kind} is not a flag type (int, float, str, bool)")
    return kind


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--flag METAVAR`` (the first spelling only), then its help and ``(default: X)`` where it
    has one; the description and epilog as written."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:  # -h, --help
            return ", ".join(action.option_strings)
        return f"{action.option_strings[0]} {self._format_args(action, action.dest.upper())}"

    def _split_lines(self, text, width):  # "ppo-clip" stays on one line
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
            shown = str(action.default).lower() if isinstance(action.default, bool) else action.default
            text += f" (default: {shown})".replace("%", "%%")
        return text


class Parser(argparse.ArgumentParser):
    """A bad flag value is a ``UsageError``: one line naming the flag (``--help`` still exits)."""

    def error(self, message):
        raise UsageError(message)


def _add_flag(group, f: dataclasses.Field, *, hidden: bool) -> None:
    kind = value_type(f)
    names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
    shown = argparse.SUPPRESS if hidden else f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    metavar = "{" + ",".join(choices()) + "}" if choices else _METAVARS[kind]
    common = dict(dest=f.name, default=_default(f))
    if kind is bool:
        group.add_argument(*names, type=boolean, nargs="?", const=True, metavar=metavar, help=shown, **common)
        no = [f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}"]
        group.add_argument(*no, action="store_false", help=argparse.SUPPRESS, **common)
    else:
        group.add_argument(*names, type=kind, metavar=metavar, help=shown, **common)


def build_parser(
    cls,
    *,
    prog: str,
    description: str,
    sections: dict[str, list[str]] | None = None,
    defaults: dict | None = None,
    hidden: set[str] = frozenset(),
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """The parser of ``cls``'s fields: those of each ``sections`` entry under its title, in its
    order, the others under "options"; ``defaults`` replace the fields' own."""
    parser = Parser(
        prog=prog,
        description=description,
        usage=f"{prog} [CONFIG.json|yaml] [--flag value ...]",
        epilog=epilog,
        formatter_class=HelpFormatter,
    )
    by_name = {f.name: f for f in dataclasses.fields(cls) if f.init}
    sections = dict(sections or {})
    placed = {name for names in sections.values() for name in names}
    if unknown := sorted(placed - set(by_name)):
        raise ValueError(f"help sections name {unknown}, which are not fields of {cls.__name__}")
    for title, names in sections.items():
        group = parser.add_argument_group(title)
        for name in names:
            _add_flag(group, by_name[name], hidden=name in hidden)
    for name, f in by_name.items():  # argparse's own "options" section, after -h
        if name not in placed:
            _add_flag(parser, f, hidden=name in hidden)
    parser.set_defaults(**(defaults or {}))
    return parser


def parse(parser: argparse.ArgumentParser, cls, argv: list[str]):
    """(``cls`` built from ``argv``, the arguments no flag took)."""
    namespace, unknown = parser.parse_known_args(argv)
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init}
    return cls(**values), unknown


# --------------------------------------------------------------------------------------------
# The parser of a preset: its defaults, the flags its estimator and loss read.


def section_fields(cls) -> dict[str, list[str]]:
    """The ``--help`` sections of a ``ppo_config()`` class, each with its fields in order:
    ``SECTIONS``, the registered hyperparameters after policy_loss."""
    params = [p.name for p in cls.HYPERPARAMETERS]
    out = {section: list(names) for section, names in config.SECTIONS.items()}
    at = out["algorithm"].index("policy_loss") + 1
    out["algorithm"][at:at] = params
    return out


def flags_read_by(entry) -> set[str]:
    """The PPOConfig fields an estimator or loss reads: its hyperparameters, the trainer options
    it names in ``reads``, and the critic's fields where it needs a critic."""
    names = {p.name for p in entry.params} | set(entry.reads)
    return names | set(config.CRITIC_FIELDS) if getattr(entry, "needs_critic", False) else names


def left_out_flags(advantage: str, policy_loss: str) -> list[tuple[str, list[str]]]:
    """The flags that only the other estimators and losses read, by the choice that reads them:
    [("--advantage gae", ["critic", "value_clip", ...]), ...]; [] where a name is unknown."""
    chosen = ((ADVANTAGES, "advantage", advantage), (POLICY_LOSSES, "policy_loss", policy_loss))
    if any(name not in entries for entries, _, name in chosen):
        return []
    used = set().union(*(flags_read_by(entries[name]) for entries, _, name in chosen))
    order = [f.name for f in dataclasses.fields(config.ppo_config())]
    out = []
    for entries, flag, _ in chosen:
        for name, entry in entries.items():
            if left_out := sorted(flags_read_by(entry) - used, key=order.index):
                out.append((f"--{flag} {name}", left_out))
    return out


def preset_parser(
    cls, name: str, description: str, advantage: str, policy_loss: str
) -> argparse.ArgumentParser:
    """The parser of the preset ``name`` (``cls``: ``config.ppo_config()``): the preset's values as
    defaults; listed, the flags that ``advantage`` and ``policy_loss`` read and every flag no
    estimator or loss owns; the others accepted and named in the epilog."""
    left_out = left_out_flags(advantage, policy_loss)
    epilog = None
    if left_out:
        epilog = "\n".join(
            ["flags of the other estimators and losses (accepted here too; --help after --advantage X",
             "or --policy_loss X lists X's):"]
            + [f"  {choice}: " + " ".join(f"--{flag}" for flag in names) for choice, names in left_out]
        )  # fmt: skip
    return build_parser(
        cls, prog=f"fastppo train {name}", description=description, sections=section_fields(cls),
        defaults=config.resolved_defaults(cls, name) | {"algo": name},
        hidden={"algo"} | {flag for _, names in left_out for flag in names}, epilog=epilog,
    )  # fmt: skip
