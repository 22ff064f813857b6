"""DESIGN.md's one idea: policy packages import neither simpy nor torch and read no clock."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICY_PACKAGES = ["wicore.scheduler", "wicore.memory", "wicore.routing"]
CLOCK_CALLS = {("time", "time"), ("time", "perf_counter"), ("time", "monotonic"), ("time", "sleep"),
               ("time", "process_time"), ("time", "time_ns"), ("datetime", "now"), ("asyncio", "sleep")}


def test_policy_packages_import_with_simpy_and_torch_blocked():
    mods = []
    for pkg in POLICY_PACKAGES:
        base = ROOT / pkg.replace(".", "/")
        if not base.exists():
            continue
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts)
            if name.endswith(".__init__"):
                name = name[: -len(".__init__")]
            mods.append(name)
    assert mods, "no policy modules found"
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('simpy', 'torch'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import importlib\nfor m in {mods!r}:\n    importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('simpy', 'torch')]\n"
        "assert not bad, bad\n"
        "print('ok', len(" + repr(mods) + "))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def _clock_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and (owner.id, node.func.attr) in CLOCK_CALLS:
                found.append(f"{path.name}:{node.lineno} {owner.id}.{node.func.attr}()")
        if isinstance(node, ast.ImportFrom) and node.module in ("time",):
            names = {a.name for a in node.names}
            if names & {"time", "perf_counter", "monotonic", "sleep"}:
                found.append(f"{path.name}:{node.lineno} from time import {names}")
    return found


def test_policy_packages_read_no_clock():
    bad = []
    for pkg in POLICY_PACKAGES:
        base = ROOT / pkg.replace(".", "/")
        for f in sorted(base.rglob("*.py")) if base.exists() else []:
            bad += _clock_calls(f)
    assert not bad, bad


def test_clock_detector_catches_a_clock_read(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import time\nt = time.perf_counter()\n")
    assert _clock_calls(f)
