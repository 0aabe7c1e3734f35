#!/usr/bin/env bash
# Quickstart, first command: run `tlshim demo` from a clean clone.
# Builds .venv-demo once (torch pinned to the CPU build before anything that depends on it, then
# tlshim with the plot extra), then finds and ablates the shipped model's induction head and
# writes induction_pattern.png. Arguments go to `tlshim demo` (e.g. --out other.png).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x .venv-demo/bin/tlshim ]]; then
    if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
    "$py" -m venv .venv-demo
    .venv-demo/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
    .venv-demo/bin/python -m pip install -q --disable-pip-version-check -e ".[plot]"
fi
exec .venv-demo/bin/tlshim demo "$@"
