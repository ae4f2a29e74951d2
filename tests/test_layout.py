"""The script folders of the repository: every script in ``benchmarks/`` and ``reproductions/`` runs as
``python -m <folder>.<name> --help`` from the repository root, with one import convention (absolute
``benchmarks.*`` / ``reproductions.*``, no ``sys.path`` edits, no bare ``import common``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("benchmarks", "reproductions")
HELPERS = {"__init__", "common", "sgd_runs"}  # imported by the scripts, not run


def _modules(helpers: bool) -> list[str]:
    return [
        f"{folder}.{path.stem}"
        for folder in FOLDERS
        for path in sorted((ROOT / folder).glob("*.py"))
        if (path.stem in HELPERS) == helpers
    ]


SCRIPTS = _modules(helpers=False)

# Runs each script as ``python -m`` would (runpy, ``__name__ == "__main__"``, argv[0] = its file) with
# ``--help`` in one interpreter, so that torch and Lightning are imported once; prints a JSON report.
_RUN_ALL = """
import contextlib, io, json, runpy, sys, traceback
report = {}
for name in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [name, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        report[name] = "returned without printing a usage and exiting"
    except SystemExit as exc:
        ok = exc.code in (0, None) and out.getvalue().startswith("usage:")
        report[name] = "ok" if ok else f"exit code {exc.code!r}, output {out.getvalue()[:200]!r}"
    except BaseException:
        report[name] = traceback.format_exc(limit=-3)
print(json.dumps(report))
"""


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_folders_hold_the_expected_scripts():
    assert len(SCRIPTS) >= 20 and "reproductions.chaotic_transients" in SCRIPTS and "benchmarks.bench_hessian" in SCRIPTS
    assert not any(name.startswith("benchmarks.reproduce_") for name in SCRIPTS), "reproductions live in reproductions/"


def test_one_import_convention():
    """No script edits ``sys.path`` or imports a sibling by its bare name."""
    bare = re.compile(r"^\s*(import|from)\s+(common|sgd_runs|bench_\w+|reproduce_\w+)\b", re.M)
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            text = path.read_text()
            assert "sys.path" not in text.replace("``sys.path``", ""), f"{path.relative_to(ROOT)} edits sys.path"
            assert not bare.search(text), f"{path.relative_to(ROOT)}: {bare.search(text).group(0).strip()}"


def test_every_script_prints_its_help_and_every_helper_imports():
    """``--help`` of every script (as ``python -m`` runs it) and an import of every helper, in one process."""
    helpers = "; ".join(f"import {name}" for name in _modules(helpers=True))
    result = _run(["-c", f"{helpers}\n{_RUN_ALL}", *SCRIPTS], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == set(SCRIPTS)
    failed = {name: why for name, why in report.items() if why != "ok"}
    assert not failed, failed


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_python_dash_m_help(name: str):
    """The literal command the READMEs give, one interpreter per script (about 5 s each)."""
    result = _run(["-m", name, "--help"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage:")
