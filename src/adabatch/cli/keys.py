"""Config keys of ``adabatch fit``: which exist, and "did you mean" for those that do not.

Nothing here knows a particular key: the known keys are those of the LightningCLI parser
once the configs (and any ``--model``/``--data`` class choice) are applied, so a task's
``model.lr``, a trainer flag and every ``adabatch.*`` argument are known exactly as the
parser knows them. ``model.lr`` and ``model.init_args.lr`` are the same key.

Used by ``adabatch fit`` (a hint after jsonargparse's error) and by ``adabatch sweep``
(every swept and fixed key is checked, and every value parsed, before any trial starts).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

# Flags that choose what the other keys are (the config, the model and data classes).
CHOOSERS = ("-c", "--config", "--model", "--data", "--model.class_path", "--data.class_path")
# Flags that are not config keys.
NOT_KEYS = ("--print_config", "--help", "-h", "--ckpt_path")


def normalise(key: str) -> str:
    """``model.init_args.lr`` -> ``model.lr`` (the form users write)."""
    return key.replace(".init_args.", ".").removeprefix("--")


def known_keys(cfg: Any) -> set[str]:
    """Every leaf key of a parsed config, and each of its parents, in the short form; a
    leaf whose value is unset (None: an object such as a policy not chosen yet) is also
    recorded as ``key.*``, since the keys below it depend on the class chosen there."""
    out: set[str] = set()
    for key in cfg.keys():
        short = normalise(key)
        parts = short.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        if cfg[key] is None:
            out.add(short + ".*")
    return out


def is_known(key: str, known: set[str]) -> bool:
    """Known exactly, or below a key whose content the parser checks only once a class is
    chosen (an unset object, ``trainer.logger.*``): the value parse then judges it."""
    key = normalise(key)
    if key in known:
        return True
    parts = key.split(".")
    parents = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(p in _FREE_FORM_PARENTS or p + ".*" in known for p in parents)


# Values that are objects or dicts of their own (class_path/init_args or free dicts): the
# parser checks below them only once a class is chosen, so keys there are not second-guessed.
_FREE_FORM_PARENTS = {"trainer.logger", "trainer.callbacks", "trainer.plugins",
                      "trainer.strategy", "trainer.profiler", "optimizer", "lr_scheduler"}


def suggestions(key: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Known keys close to ``key`` (difflib ratio >= 0.6), best first: the best one and any
    others nearly as close (within 0.05), at most ``n``.

    Example::

        >>> suggestions("adabatch.max_batchsize",
        ...             {"adabatch.max_batch_size", "adabatch.min_batch_size", "model.lr"})
        ['adabatch.max_batch_size']
    """
    key = normalise(key)
    names = {k for k in known if not k.endswith(".*")}
    scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in names),
                    key=lambda t: (-t[0], t[1]))
    if not scored or scored[0][0] < 0.6:
        return []
    best = scored[0][0]
    return [k for r, k in scored[:n] if r >= best - 0.05]


def unknown_key_message(key: str, known: set[str]) -> str:
    """``unknown key 'x'; did you mean 'y'?`` (or the section's keys when nothing is close)."""
    key = normalise(key)
    close = suggestions(key, known)
    if close:
        return f"unknown key {key!r}; did you mean {' or '.join(repr(k) for k in close)}?"
    return f"unknown key {key!r} (see `adabatch fit --help` or --print_config for the keys)"


def flag_keys(args: Sequence[str]) -> list[str]:
    """The config keys that ``--key=value`` / ``--key value`` arguments set."""
    keys = []
    for a in args:
        if not a.startswith("--"):
            continue
        flag = a.split("=", 1)[0]
        if flag in CHOOSERS or flag in NOT_KEYS:
            continue
        keys.append(flag[2:])
    return keys


def choosing_args(args: Sequence[str]) -> list[str]:
    """The arguments that choose configs and classes (with their values), in order."""
    out: list[str] = []
    it = iter(range(len(args)))
    for i in it:
        a = args[i]
        flag = a.split("=", 1)[0]
        if flag in CHOOSERS:
            if "=" in a or i + 1 >= len(args):
                out.append(a)
            else:
                out += [a, args[i + 1]]
                next(it, None)
    return out


def subcommand_parser(subcommand: str = "fit") -> Any:
    """The LightningCLI parser of ``adabatch SUBCOMMAND`` (nothing parsed or run)."""
    from adabatch.cli.fit import build_parser

    parser = build_parser()
    return parser._subcommands_action._name_parser_map[subcommand]


def known_keys_for(sub_parser: Any, args: Sequence[str]) -> set[str]:
    """The keys the parser knows once the choosing arguments in ``args`` are applied."""
    cfg = sub_parser.parse_args(choosing_args(args), defaults=True)
    return known_keys(cfg)


def misspelled(sub_parser: Any, args: Sequence[str]) -> list[str]:
    """A "did you mean" message for each key in ``args`` the parser does not know."""
    try:
        known = known_keys_for(sub_parser, args)
    except BaseException:  # the configs themselves do not parse: jsonargparse says why
        return []
    return [unknown_key_message(k, known) for k in flag_keys(args) if not is_known(k, known)]
