#!/usr/bin/env bash
# One entry point for a fresh clone:
#   ./run.sh demo   set up .venv (first time only) and train on the embedded digits data with all callbacks
#   ./run.sh test   set up .venv (first time only) and run the whole test suite (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
    rm -f "$VENV"/.installed-* && touch "$stamp"
fi
# The demo and test models are tiny: extra intra-op threads only contend on a small machine
# (the quickstart took 8 minutes with 2 threads on a busy 2-core box, 20 s with one).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
command=${1:-}
shift || true
case "$command" in
    demo) exec "$VENV/bin/chaos-train" fit --config configs/quickstart.yaml "$@" ;;
    test) exec "$VENV/bin/python" -m pytest "$@" ;;
    *) echo "usage: ./run.sh demo|test [args]" >&2; exit 2 ;;
esac
