"""Run the sweep over every causal-LM type of the installed transformers and print (or write) its table.

    python scripts/sweep.py                 # print the counts and the reasons, grouped
    python scripts/sweep.py --write         # also write tlshim/sweep.json and README.md's table
    python scripts/sweep.py gpt2 llama      # just these types

tlshim/sweep.json keeps, per transformers major.minor, every type's result; the types verified there
install without a warning on that version (``tlshim.registry.verified_types``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: see tests/sweep.py

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402

from sweep import FAILED, NOT_RUN, UNSUPPORTED, VERIFIED, sweep  # noqa: E402

TABLE = ROOT / "tlshim" / "sweep.json"
README = ROOT / "README.md"
START, END = "<!-- sweep:start -->", "<!-- sweep:end -->"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*")
    parser.add_argument("--write", action="store_true", help="write tlshim/sweep.json and README.md's table")
    args = parser.parse_args(argv)
    results = sweep(args.types or None, progress=True)
    version = Version(transformers.__version__)
    print(summary(results, version))
    if args.write:
        key = f"{version.major}.{version.minor}"
        table = json.loads(TABLE.read_text()) if TABLE.exists() else {}
        table.setdefault("results", {})[key] = results
        TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        text = README.read_text()
        block = f"{START}\n{markdown(table)}\n{END}"
        README.write_text(re.sub(f"{START}.*?{END}", lambda _: block, text, flags=re.S) if START in text else text + "\n" + block + "\n")
    return 0


def _group(reason: str) -> str:
    """A reason without its model-specific names, so that types failing alike group together."""
    return re.sub(r"\b\w+(ForCausalLM|DecoderLayer|Attention|MLP|Block|Layer|Model)\b", "<module>", reason or "")[:150]


def summary(results, version) -> str:
    counts = collections.Counter(r["status"] for r in results.values())
    runnable = len(results) - counts[NOT_RUN]
    lines = [
        f"transformers {version}: {counts[VERIFIED]} of {runnable} runnable causal-LM types verified "
        f"({counts[UNSUPPORTED]} unsupported, {counts[FAILED]} failed; {counts[NOT_RUN]} not runnable tiny)"
    ]
    for status in (FAILED, UNSUPPORTED, NOT_RUN):
        groups = collections.defaultdict(list)
        for model_type, result in sorted(results.items()):
            if result["status"] == status:
                groups[_group(result.get("reason", ""))].append(model_type)
        for reason, types in sorted(groups.items(), key=lambda item: -len(item[1])):
            lines.append(f"  {status} ({len(types)}): {reason}: {', '.join(types)}")
    return "\n".join(lines)


def markdown(table) -> str:
    lines = ["| transformers | verified | unsupported | failed | not runnable | verified types |", "|---|---|---|---|---|---|"]
    for key, results in sorted(table.get("results", {}).items(), key=lambda item: Version(item[0])):
        counts = collections.Counter(r["status"] for r in results.values())
        verified = ", ".join(sorted(t for t, r in results.items() if r["status"] == VERIFIED))
        lines.append(f"| {key} | {counts[VERIFIED]} | {counts[UNSUPPORTED]} | {counts[FAILED]} | {counts[NOT_RUN]} | {verified} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
