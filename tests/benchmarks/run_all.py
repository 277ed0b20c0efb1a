"""Run every benchmark script, each in a fresh process, and summarise the targets.

The CPU scripts always run; `gpu.py` runs when JAX sees a GPU (or with `--gpu`). Each
script's output is printed when it ends, then every `[met]` / `[MISSED]` line again.
The exit status is non-zero when a script fails or, outside `--tiny`, a target is missed.

Run: `python tests/benchmarks/run_all.py [--tiny] [--gpu]`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU_SCRIPTS = [
    "dispatch.py",
    "surgery.py",
    "finetune_step.py",
    "compile.py",
    "memory.py",
    "checkpoints.py",
    "remat.py",
]


def _has_gpu() -> bool:
    import jax

    return any(d.platform == "gpu" for d in jax.devices())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke runs at toy sizes")
    parser.add_argument("--gpu", action="store_true", help="run gpu.py even without a GPU")
    args = parser.parse_args()
    scripts = CPU_SCRIPTS + (["gpu.py"] if args.gpu or _has_gpu() else [])
    verdicts: list[str] = []
    failed: list[str] = []
    for script in scripts:
        start = time.perf_counter()
        command = [sys.executable, str(HERE / script)] + (["--tiny"] if args.tiny else [])
        result = subprocess.run(command, capture_output=True, text=True)
        print(result.stdout, end="")
        if result.returncode != 0:
            print(result.stderr, end="")
            failed.append(script)
        print(f"({script}: {time.perf_counter() - start:.0f} s)\n", flush=True)
        verdicts += [line for line in result.stdout.splitlines() if line.startswith("[")]
    print("== Summary")
    print("\n".join(verdicts))
    missed = [v for v in verdicts if v.startswith("[MISSED]")]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    counts = {
        tag: sum(v.startswith(f"[{tag}]") for v in verdicts) for tag in ("met", "MISSED", "smoke")
    }
    print(", ".join(f"{tag}: {n}" for tag, n in counts.items()))
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
