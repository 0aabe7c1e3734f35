"""The ``tlshim`` command: ``tlshim demo``, ``tlshim doctor`` and ``tlshim verify PATH``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tlshim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="installed versions and which architectures are supported here")
    demo = commands.add_parser("demo", help="find and ablate the induction head of the shipped model")
    demo.add_argument("--out", default="induction_pattern.png", help="where to write the attention pattern PNG")
    verify = commands.add_parser("verify", help="check every hook of a checkpoint's model against HOOKS.md's invariants")
    verify.add_argument("path", help="a checkpoint folder (or hub name already in the local cache)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "verify":
        return _verify(args.path)
    if args.command == "doctor":
        from . import doctor

        return doctor.main(rest)
    from . import demo as demo_module

    return demo_module.main(["--out", args.out, *rest])


def _verify(path) -> int:
    from .loading import from_pretrained
    from .verify import verify

    report = verify(from_pretrained(path, install=False))
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
