"""The runnable example of the README's Python API (``examples/own_training_loop.py``), at a few steps."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_training_loop.py"


def test_own_training_loop_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--quick"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    steps = re.findall(r"step (\d+): L_CE ([\d.]+)  L_EM ([\d.]+)  L_AT ([\d.]+)  kept (\d+)/22", out)
    assert [int(s[0]) for s in steps] == [1, 2, 3, 4, 5]
    assert float(steps[0][2]) == 0.0 and int(steps[0][4]) == 0  # p_t = 1 before M_post's first sync keeps no row
    assert all(float(s[3]) > 0 for s in steps)  # the pairs' maps differ: L_AT is on
    final = re.search(r"DAAA: target test accuracy ([\d.]+)%", out)
    assert final and 0.0 <= float(final.group(1)) <= 100.0
