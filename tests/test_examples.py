"""The README's main job runs end to end (quick mode) and reports real measurements."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["linear probe", "BitFit", "gradual unfreezing", "full fine-tuning"]


def test_finetune_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/finetune.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    rows = dict(re.findall(r"^\| ([a-zA-Z ()-]+?)\s+\|\s+([0-9.]+) \|", out, re.M))
    assert set(RECIPES) <= set(rows), out
    # Five classes: chance is 0.2; even a few steps of each recipe do better.
    assert all(float(rows[name]) > 0.3 for name in RECIPES), out
    assert "backbone bit-identical to the checkpoint's: yes" in out
    assert re.search(r"MC dropout .* entropy [0-9.]+ on \d+ correct", out), out
    assert (tmp_path / "pretrained.safetensors").exists()
    assert (tmp_path / "finetune.png").stat().st_size > 10_000
