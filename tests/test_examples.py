"""The README's main job runs end to end (quick mode) and reports real accuracies."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_finetune_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/finetune.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = dict(
        re.findall(r"^(linear probe|BitFit|full fine-tuning)\s+([0-9.]+)", result.stdout, re.M)
    )
    assert set(rows) == {"linear probe", "BitFit", "full fine-tuning"}, result.stdout
    # Five classes: chance is 0.2.
    assert all(float(acc) > 0.3 for acc in rows.values()), result.stdout
    assert (tmp_path / "pretrained.safetensors").exists()
