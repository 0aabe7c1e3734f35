"""The ``tlshim`` command: ``tlshim demo``, ``tlshim doctor``, ``tlshim harvest`` and ``tlshim verify PATH``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tlshim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="installed versions and which architectures are supported here")
    commands.add_parser("demo", add_help=False, help="a report of induction heads, logit lens, patching and steering on a real model "
                                     "(--arch: a small shipped model); tlshim demo --help")
    commands.add_parser("harvest", help="store activations over a dataset, sharded (torchrun for several processes)", add_help=False)
    verify = commands.add_parser("verify", help="check every hook of a checkpoint's model against HOOKS.md's invariants")
    verify.add_argument("path", help="a checkpoint folder (or hub name already in the local cache)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "verify":
        return _verify(args.path)
    if args.command == "harvest":
        from . import harvest_cli

        return harvest_cli.main(rest)
    if args.command == "doctor":
        from . import doctor

        return doctor.main(rest)
    from . import demo as demo_module

    return demo_module.main(rest)


def _verify(path) -> int:
    from .loading import from_pretrained
    from .verify import verify

    report = verify(from_pretrained(path, install=False))
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
