"""Benchmarks behind `dr bench NAME`: each module has run(quick: bool) -> dict with stable keys."""
from __future__ import annotations

import json
import subprocess
import sys


def run_module_json(module: str, args: list[str]) -> dict:
    """Run `python -m module args` in a fresh interpreter (its own JVM / threads) and parse its last stdout line as JSON."""
    p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=False)
    if p.returncode:
        raise RuntimeError(f"benchmark subprocess {module} {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
