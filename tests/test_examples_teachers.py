"""Smoke tests of examples/teacher.py and examples/target_network.py (short runs, a few seconds).

Each example checks its own claim while it runs and prints it; these tests hold them to it:
the functional_call and swap teachers give identical training, and the hard target is an
exact copy every N steps and frozen in between.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(out: str) -> list[list[str]]:
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]


def test_teacher_example_functional_call_equals_the_swap():
    out = run("teacher.py", "--steps", "60")
    assert "identical weights: True" in out, out
    rows = [r for r in table_rows(out) if r[0].isdigit()]
    assert len(rows) == 6, out
    for _step, *accuracies, diff in rows:
        assert all(0.0 <= float(a) <= 100.0 for a in accuracies) and float(diff) == 0.0, rows


def test_target_network_example_hard_target_is_exact():
    out = run("target_network.py", "--steps", "120", "--seeds", "1", "--hard-every", "20")
    assert "frozen in between: True" in out, out
    rows = {r[0]: r for r in table_rows(out) if r[0].startswith(("no target", "soft", "hard"))}
    assert set(rows) == {"no target", "soft, decay=0.995", "hard, every 20"}, out
