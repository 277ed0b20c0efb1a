"""The benchmark scripts in tests/benchmarks/ still run (smoke runs at toy sizes), so they
keep up with the API, and their own checks pass: every variant trains the same model,
frozen arrays stay bit-identical, and Adam state is exactly 2x the trainable bytes.

(compile.py --tiny takes about 30 s and gpu.py --tiny about 3 minutes on a 2-core CPU:
run those by hand, or through `python tests/benchmarks/run_all.py --tiny --gpu`.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "tests" / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["dispatch.py", "surgery.py", "finetune_step.py", "memory.py"])
def test_benchmark_smoke_run(script):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("[smoke] ") for line in lines), result.stdout[-3000:]
    assert not any(line.startswith(("[met]", "[MISSED]")) for line in lines)
