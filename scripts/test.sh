#!/usr/bin/env bash
# The test suite on every transformers version of the matrix, from a clean clone on a fresh
# machine (the README's test command; CI runs it through .ci/run).
# Builds .venv with tox + tox-uv, runs the whole tox matrix (one env per transformers
# release, see tox.ini) two envs at a time, then prints every env's pytest summary line
# and a total line. Exits non-zero if any env fails.
# Extra arguments go to tox, e.g. `bash scripts/test.sh -e tf448,latest`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Tested versions; bump together.
TOX_SPEC=${TLSHIM_TOX_SPEC:-"tox==4.67.15 tox-uv==1.37.1"}
# 2 envs at a time suits these 2-core machines: env creation is ~5 s an env with a warm uv
# cache, so the matrix time is the tests' CPU time; more envs at once only contend for it.
PARALLEL=${TLSHIM_TOX_PARALLEL:-2}
# CI tests the built wheel (tox.ini's default is an editable install, for development):
# a package missing from pyproject's list or package-data fails here, not after release.
PACKAGE=${TLSHIM_TOX_PACKAGE:-wheel}

PY=${PYTHON:-}
if [[ -z $PY ]]; then
    # the local CPU torch wheel is for CPython 3.11
    if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi

# a `.venv` *file* is a redirect left by a tox run from elsewhere: not ours to keep
if [[ -e .venv && ! -d .venv ]]; then rm -f .venv; fi
if [[ ! -x .venv/bin/tox ]]; then
    echo "::: bootstrapping .venv with $TOX_SPEC"
    "$PY" -m venv .venv
    # (pip's machine config names local index folders that may be absent: drop those warnings)
    # shellcheck disable=SC2086
    { .venv/bin/python -m pip install -q --disable-pip-version-check $TOX_SPEC 2>&1 1>&3 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; } 3>&1
fi

# uv does not read pip's configuration: pass pip's find-links folder (the local CPU torch
# wheel) on through PIP_FIND_LINKS, which tox.ini hands to uv as UV_FIND_LINKS.
if [[ -z ${PIP_FIND_LINKS:-} && -z ${UV_FIND_LINKS:-} ]]; then
    PIP_FIND_LINKS=$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)
    export PIP_FIND_LINKS
fi
if [[ -z ${PIP_FIND_LINKS:-} && -z ${UV_FIND_LINKS:-} ]]; then
    echo "::: warning: no find-links folder known; torch==2.13.0+cpu can only come from one" >&2
fi

# pyproject lists its packages by hand (patches/ is mapped to tlshim.patches): a folder
# left out would be missing from the wheel, so name it here rather than in an ImportError.
.venv/bin/python - <<'PY'
import pathlib
import sys
import tomllib

st = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["tool"]["setuptools"]
listed, dirs = set(st.get("packages", [])), st.get("package-dir", {})
found = set()
for top, folder in dirs.items():
    for init in pathlib.Path(folder).rglob("__init__.py"):
        rel = init.parent.relative_to(folder).parts
        if "__pycache__" not in rel:
            found.add(".".join((top, *rel)))
missing = sorted(found - listed)
if missing:
    sys.exit("::: pyproject.toml [tool.setuptools] packages lacks: " + ", ".join(missing))
PY

# Two pytest processes share two cores: one torch thread each avoids oversubscription.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

result=$(mktemp "${TMPDIR:-/tmp}/tlshim-tox-XXXXXX.json")
trap 'rm -f "$result"' EXIT

start=$SECONDS
rc=0
tox_args=("$@")
advisory=""
envs=""
if [[ $# -eq 0 ]]; then
    # `latest` is the newest transformers release. While it is the newest pinned env's version it
    # is built (seconds) and not run twice; when a newer release is out it runs, reported loudly at
    # the end, without failing this script on its own: the pinned envs gate (README, "A new
    # transformers release").
    envs=$(.venv/bin/tox config -q -k env_name 2>/dev/null | sed -n 's/^env_name = //p' | paste -sd, - || true)
    pinned_env=$(tr ',' '\n' <<<"$envs" | { grep -E '^tf[0-9]+$' || true; } | tail -n 1)
    pinned=$(.venv/bin/tox config -q -e "$pinned_env" -k deps 2>/dev/null | sed -n 's/^ *transformers==//p' || true)
    newest=""
    if .venv/bin/tox run -q -e latest --notest -x "testenv.package=$PACKAGE" >/dev/null 2>&1; then
        newest=$(.tox/latest/bin/python -c 'import importlib.metadata as m; print(m.version("transformers"))' 2>/dev/null || true)
    fi
    if [[ -n $newest && $newest == "$pinned" ]]; then
        echo "::: latest resolves to transformers $newest, the same as $pinned_env: not run twice"
        envs=$(tr ',' '\n' <<<"$envs" | { grep -vx latest || true; } | paste -sd, -)
    else
        advisory=latest
        echo "::: latest resolves to transformers ${newest:-(it did not build)}, newer than $pinned_env ($pinned): run, not gating"
    fi
    if [[ -n $envs ]]; then tox_args=(-e "$envs"); fi
fi
# -p: failed envs' output is shown by tox itself; the summaries come from the JSON, which decides
# the exit code (tox's own fails for an advisory env too).
.venv/bin/tox run-parallel -p "$PARALLEL" --parallel-no-spinner -x "testenv.package=$PACKAGE" \
    --result-json "$result" "${tox_args[@]}" || rc=$?
echo "::: tox finished in $((SECONDS - start)) s with exit code $rc"
if [[ -n $advisory ]]; then rc=0; fi

.venv/bin/python - "$result" "$advisory" "$envs" <<'PY' || rc=$((rc == 0 ? 1 : rc))
import json
import re
import sys

try:
    with open(sys.argv[1]) as fh:
        report = json.load(fh)
except (OSError, ValueError) as exc:
    print(f"::: no tox result to summarise ({exc})")
    sys.exit(1)

SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed|skipped|error|errors|xfailed|xpassed|deselected|warnings?)\b.*?)\s*=*$")
SKIPPED = re.compile(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b")
totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
bad, reports = [], []
advisory = set(filter(None, sys.argv[2].split(",")))
requested = set(filter(None, sys.argv[3].split(",")))  # the default run's envs, each of which must run


def failures(env):
    """The FAILED / ERROR lines of pytest's short summary, from an env's test output."""
    lines = []
    for cmd in env.get("test", []):
        lines += [l for l in cmd.get("output", "").splitlines() if l.startswith(("FAILED ", "ERROR "))]
    return lines


print("::: per-env pytest summaries")
for name, env in report.get("testenvs", {}).items():
    if name.startswith("."):  # the packaging env
        continue
    if "result" not in env:  # not asked for, or its setup failed
        if name in requested and name not in advisory:
            bad.append(f"{name} (not run)")
        continue
    versions = {p.split("==")[0]: p.split("==")[1] for p in env.get("installed_packages", []) if "==" in p}
    label = f"transformers {versions.get('transformers', '?')}, torch {versions.get('torch', '?')}"
    result = env.get("result", {})
    summary, skips = None, {}
    for cmd in env.get("test", []):
        for line in (cmd.get("output", "") + "\n" + cmd.get("err", "")).splitlines():
            m = SUMMARY.match(line.strip())
            if m and COUNT.search(line):
                summary = m.group(1)
            m = SKIPPED.match(line)
            if m:  # pytest -rs: "SKIPPED [n] file:line: reason"
                skips[m.group(2)] = skips.get(m.group(2), 0) + int(m.group(1))
    ok = result.get("success", False)
    if name in advisory:
        reports.append((name, label, summary, ok, failures(env)))
        continue
    if summary:
        for n, kind in COUNT.findall(summary):
            key = "error" if kind.startswith("error") else kind
            totals[key] = totals.get(key, 0) + int(n)  # xfailed / xpassed too (the sae env has strict xfails)
    if not ok:
        bad.append(name)
    print(f"{name}: {summary or 'no pytest summary'} [{label}]{'' if ok else ' FAILED (exit %s)' % result.get('exit_code')}")
    for reason, n in skips.items():
        print(f"    {n} skipped: {reason}")
for name, label, summary, ok, failed_tests in reports:
    verdict = "passes" if ok else "FAILS"
    print(f"::: ADVISORY, not gating: {name} [{label}] {verdict}: {summary or 'no pytest summary'}")
    for line in failed_tests:
        print(f"::: {name} {line}")
    if not ok:
        print("::: a transformers release newer than the pinned matrix breaks tlshim: see README, 'A new transformers release'")
failed = totals["failed"] + totals["error"]
print(f"total: {totals['passed']} passed, {failed} failed, {totals['skipped']} skipped")
if bad:
    print("::: failed envs: " + ", ".join(bad))
    sys.exit(1)
PY
exit "$rc"
