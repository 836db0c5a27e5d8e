"""Command-line flags derived from the option table (private module).

``cpusparse train`` and ``cpusparse trace`` add their training flags with
:func:`add_options`: the flag, its type, its allowed values and its help text come
from :func:`cpusparse.training.config.options`; only the default may be the front
end's own. ``--help`` shows every default once (argparse's
``ArgumentDefaultsHelpFormatter``), so no help text spells a default out.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypedDict, TypeVar

from ..training.config import PRESETS, Bool, Choice, Int, Real, options

__all__ = [
    "add_options",
    "add_preset",
    "preset_of",
    "layer_sizes",
    "int_at_least",
    "HelpFormatter",
]

_T = TypeVar("_T")


class _ArgumentOptions(TypedDict, total=False):
    # The keywords add_options passes to ``add_argument``.
    default: object
    help: str
    dest: str
    choices: tuple[str, ...]
    action: type[argparse.Action]
    type: Callable[[str], object]
    metavar: str


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` once per flag, and nothing for flags without a default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, argparse.SUPPRESS) or action.option_strings == []:
            return action.help
        if "(default:" in (action.help or ""):
            return action.help
        if isinstance(action, argparse._StoreTrueAction) and action.default is False:
            return action.help
        return super()._get_help_string(action)


def layer_sizes(text: str) -> list[int]:
    """Parse a comma-separated list of positive ints (an argparse ``type``)."""
    parts = text.split(",")
    if parts and not parts[-1].strip():
        parts = parts[:-1]  # a trailing comma, as in "300,"
    try:
        sizes = [int(part) for part in parts]
    except ValueError:  # also an empty part, as in "4,,8"
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"must be positive ints such as 300,100, got {text!r}")
    return sizes


def _none_or(kind: Callable[[str], _T]) -> Callable[[str], _T | None]:
    def parse(text: str) -> _T | None:
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an int' if kind is int else 'a number'} or none, got {text!r}"
            ) from None

    parse.__name__ = kind.__name__
    return parse


def preset_of(argv: Sequence[str] | None) -> str:
    """The ``--preset`` named in ``argv`` (``"paper"`` without one or with a bad one).

    Read before the full parser is built, so that a preset sets the defaults that
    ``--help`` shows; a bad name is reported by the full parser.
    """
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="paper")
    known, _ = first.parse_known_args(list(argv or []))
    return known.preset if known.preset in PRESETS else "paper"


def add_preset(group: argparse._ActionsContainer, preset: str) -> dict[str, object]:
    """Add ``--preset``; return the preset's options, the defaults of the training flags."""
    group.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="paper",
        help="start from a named set of training options: the paper's mathematics, or the "
        "settings of the authors' released code; explicit flags override it",
    )
    return dict(PRESETS[preset])


def add_options(
    group: argparse._ActionsContainer,
    names: Iterable[str],
    defaults: Mapping[str, object] | None = None,
    *,
    dest: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per option-table row in ``names`` to an argparse group.

    Parameters
    ----------
    group : argparse parser or argument group
    names : iterable of str
        Rows of :func:`~cpusparse.training.config.options` to expose.
    defaults : dict, optional
        The front end's own defaults by option name; the table's otherwise.
    dest : dict, optional
        The attribute name of each flag's value by option name (the option name
        otherwise), e.g. the classifier's parameter name.
    """
    table = {option.name: option for option in options()}
    defaults = defaults or {}
    dest = dest or {}
    for name in names:
        option = table[name]
        default = defaults.get(name, option.default)
        kwargs: _ArgumentOptions = {
            "default": default,
            "help": option.help,
            "dest": dest.get(name, name),
        }
        constraint = option.constraint
        if isinstance(constraint, Choice):
            kwargs["choices"] = constraint.values
        elif isinstance(constraint, Bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(constraint, Int):
            kwargs["type"] = int
        elif isinstance(constraint, Real):
            kwargs["type"] = _none_or(float) if constraint.none else float
            kwargs["metavar"] = "X"
        group.add_argument(option.flag, **kwargs)


def thread_count(text: str) -> int:
    """An argparse ``type``: threads as ``n_jobs`` takes them.

    An int >= 1, or a negative one counted from all cores as in scikit-learn (-1 or
    ``all`` is every core, -2 all but one).
    """
    if text.strip().lower() == "all":
        return -1
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an int >= 1, or 'all' or a negative int counted from all cores, got {text!r}"
        ) from None
    if value == 0:
        raise argparse.ArgumentTypeError(
            "must be an int >= 1, or 'all' or a negative int counted from all cores, got 0"
        )
    return value


thread_count.__name__ = "threads"


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse
