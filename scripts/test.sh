#!/usr/bin/env bash
# The README's second command: set up .venv if needed, then run the whole test suite (fast tests on a tiny
# random model, slow ones on the real encoder), after a lint pass (ruff), on $FEDLEASE_TEST_WORKERS pytest-xdist
# workers (default 2: the Flower tests spend much of their time waiting on SuperNodes' polls, which a second
# worker fills). Extra arguments go to pytest (e.g. -m "not slow", -k clustering, -n 0 for one process).
# pytest's "no tests collected" (exit 5) counts as a failure.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/scripts/venv.sh") || exit 1
cd "$root" || exit 1
"$venv/bin/ruff" check --quiet src tests tools $(ls -d benchmarks 2>/dev/null) || exit 1
"$venv/bin/python" -m pytest -n "${FEDLEASE_TEST_WORKERS:-2}" "$@"
code=$?
if [ "$code" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$code"
