"""``python -m tlshim doctor``: what this environment supports, as a table (``tlshim.supported()`` as data)."""

from __future__ import annotations

from .registry import supported


def report() -> str:
    info = supported()
    lines = [
        f"torch {info['torch']}, transformers {info['transformers']}",
        f"test matrix: transformers {', '.join(info['tested_versions'])} and the newest release",
        "",
        f"{'model_type':<12} {'supported':<10} {'spec':<36} ranges",
    ]
    for model_type, arch in info["architectures"].items():
        spec = arch["spec"] or "-"
        lines.append(f"{model_type:<12} {'yes' if arch['supported'] else 'NO':<10} {spec:<36} {'; '.join(arch['ranges'])}")
    sweep = info["sweep"]
    if any(sweep.values()):
        counts = ", ".join(f"{len(types)} {status}" for status, types in sweep.items())
        lines += ["", f"the sweep of every causal-LM type on this transformers version: {counts}"]
        lines.append("verified: " + ", ".join(sweep["verified"]))
        lines.append("any other type installs through the structural path with a warning, or raises naming what it lacks")
    else:
        lines += ["", "no sweep of this transformers version: types without a spec install with a warning (run tlshim.verify)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0
