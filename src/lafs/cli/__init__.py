"""``lafs <command>``: the one entry point.

This folder holds every entry point of the package, one module per command group: ``models`` (models, presets,
export, convert), ``runs`` (experiment, demo, bench, toy-affine; their work in ``experiment``, ``demo``, ``bench``,
``toy_affine``), ``train`` (train, pretrain, finetune), ``evaluate`` (eval, probe, embed, verify) and ``data`` (pack,
detect, bin, subset, align, synth, check). ``python -m lafs.cli`` (and ``torchrun -m lafs.cli``) runs :func:`main`.
Every command that runs something takes ``--config FILE`` and dotted ``key=value`` overrides, validated against
``lafs.config``; a bad key or value stops with a message naming it (exit code 2).
"""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from . import data, evaluate, models, runs, train


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="lafs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lafs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (models, runs, train, evaluate, data):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting KEY=VALUE positionals at the first option (`--out x a=b`): take the rest too
    if args.command == "toy-affine":
        args.toy_args, extra = extra, []
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"lafs: config error: {err}", file=sys.stderr)
        return 2
    except KeyError as err:  # unknown backbone, size or option
        print(f"lafs: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # bad input files: the message names file and record
        print(f"lafs: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # an optional extra is missing: the message names the pip command
        print(f"lafs: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
