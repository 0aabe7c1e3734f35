"""tlshim's sweep (tlshim/sweep.json) against the TransformerBridge's (benchmarks/bridge_sweep.json).

    python3 scripts/compare_coverage.py          # every transformers version both tables have
    python3 scripts/compare_coverage.py 5.23     # one version
    python3 scripts/compare_coverage.py --strict # the bridge's passes without its resid_mid quirk only

Prints, per version: how many types the bridge passes, how many tlshim verifies, and the types the
bridge passes that tlshim does not verify (tlshim's status and reason beside each): the list to close
for issue 10's target. By default a bridge pass counts the types where every check holds but the
resid_mid edit (the bridge's hook_resid_mid is the MLP norm's input hook: an edit of it reaches the MLP
and not the residual stream); ``--strict`` counts only the types where every check holds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TLSHIM, BRIDGE = ROOT / "tlshim" / "sweep.json", ROOT / "benchmarks" / "bridge_sweep.json"
# the status strings of tests/sweep.py and scripts/bridge_sweep.py (not imported: those load torch)
VERIFIED, PASSES, PASSES_BUT_MID = "verified", "passes", "passes but the resid_mid edit"


def compare(version: str, ours: dict, bridge: dict, strict: bool = False) -> str:
    passing = {PASSES} if strict else {PASSES, PASSES_BUT_MID}
    passed = sorted(t for t, r in bridge.items() if r["status"] in passing)
    verified = sorted(t for t, r in ours.items() if r["status"] == VERIFIED)
    missing = [t for t in passed if t not in verified]
    lines = [
        f"transformers {version}: the bridge passes {len(passed)}{' (strict)' if strict else ''}; "
        f"tlshim verifies {len(verified)}; both {len(passed) - len(missing)}; tlshim only {len(set(verified) - set(passed))}",
        f"  the bridge passes and tlshim does not verify ({len(missing)}):",
    ]
    for model_type in missing:
        result = ours.get(model_type, {"status": "not in tlshim's sweep"})
        lines.append(f"    {model_type}: {result['status']}{': ' + result['reason'][:160] if result.get('reason') else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", help="transformers major.minor keys, e.g. 5.23 (default: every shared one)")
    parser.add_argument("--strict", action="store_true", help="count only the bridge's passes without its resid_mid quirk")
    args = parser.parse_args(argv)
    ours, bridge = (json.loads(path.read_text())["results"] for path in (TLSHIM, BRIDGE))
    versions = args.versions or sorted(set(ours) & set(bridge), key=lambda v: tuple(map(int, v.split("."))))
    for version in versions:
        if version not in ours or version not in bridge:
            have = f"tlshim: {', '.join(sorted(ours))}; bridge: {', '.join(sorted(bridge))}"
            sys.exit(f"no results for transformers {version} in both tables ({have}); run scripts/sweep.py --write / scripts/bridge_sweep.py --write there")
        print(compare(version, ours[version], bridge[version], args.strict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
