"""The layering of docs/design.md: pure cores never import Lightning."""

import subprocess
import sys
from pathlib import Path

import chaos_callbacks

ROOT = Path(__file__).resolve().parents[1]


def _pure_modules() -> list[str]:
    mods = []
    for pkg in ("curvature", "dynamics"):
        for f in sorted((ROOT / "chaos_callbacks" / pkg).glob("*.py")):
            mods.append(f"chaos_callbacks.{pkg}" + ("" if f.stem == "__init__" else f".{f.stem}"))
    return mods


def test_pure_cores_do_not_import_lightning():
    code = "import sys\n" + "".join(f"import {m}\n" for m in _pure_modules()) + (
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_exported_callback_resolves():
    for name in chaos_callbacks.__all__:
        assert getattr(chaos_callbacks, name).__name__ == name
