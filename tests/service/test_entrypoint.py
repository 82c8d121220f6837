"""What the server's entry point sets up before anything else is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Records the variable's value at the moment torch starts importing: MKL reads it at its
# first allocation, so a value set after that would be too late to count.
_PROBE = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("MKL_DISABLE_FAST_MM", "<unset>"))
sys.meta_path.insert(0, Watch())
import service.__main__
print(seen[0] if seen else "<torch not imported>")
"""


def _value_at_torch_import(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env=env, timeout=120, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1]


def test_mkl_buffer_pools_are_off_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    assert _value_at_torch_import(env) == "1"


def test_an_operators_own_mkl_setting_wins():
    assert _value_at_torch_import({**os.environ, "MKL_DISABLE_FAST_MM": "0"}) == "0"
