"""Checkpoint cost: `treenn.save`/`treenn.load` of a 1 GiB model against
`safetensors.numpy.save_file`/`load_file` and `np.save`/`np.load`, in the same run.

The model is 16 float32 arrays of 1/16 of the size each (64 MiB for 1 GiB) plus a few
small ones, as JAX arrays. Times are medians of rounds interleaved in one process
(`_harness.interleaved`); the baselines' loads end in JAX arrays too (`jnp.asarray`), as
treenn's do. Peak extra host memory is measured in a fresh process per candidate: the
peak resident set size (Linux's VmHWM, reset through /proc/self/clear_refs just before
the call) less the resident size before it, so the allocator's cache from earlier calls
cannot hide an allocation. `treenn.save` also fsyncs the file and its folder (a crash
leaves the old checkpoint or the new one); the baselines do not.

A second part loads a model of many tiny arrays (`--many`, 24,000 by default), all
trainable and all frozen, in the same run: the frozen one must not cost more per array
(loading used to look each path up in the list of frozen paths: quadratic).

Run: `python tests/benchmarks/checkpoints.py [--size MiB] [--many N] [--repeats 3] [--tiny]`.
Targets: `treenn.save` needs at most the largest array in extra host memory (streamed),
`treenn.load` at most the model plus the largest array; both within 2x of
`safetensors.numpy`'s time; loading N tiny frozen arrays within 1.5x of N trainable ones.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from _harness import Verdicts, header, interleaved, median, spread

import treenn

MIB = 2**20
PARTS = 16  # big arrays; the largest is size / PARTS
SLACK = 16 * MIB  # Python objects, the JSON header, the interpreter's own growth


def make(size_mib: int) -> dict[str, Any]:
    """`PARTS` arrays of `size_mib / PARTS` MiB each, plus a few small ones."""
    n = size_mib * MIB // PARTS // 4
    keys = jax.random.split(jax.random.key(0), PARTS)
    model: dict[str, Any] = {f"w{i}": jax.random.normal(k, (n,)) for i, k in enumerate(keys)}
    model.update({f"b{i}": jnp.full((256,), float(i)) for i in range(8)})
    jax.block_until_ready(model)
    return model


def numpy_arrays(model: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.asarray(x) for name, x in model.items()}


def np_save(path: Path, model: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        for x in model.values():
            np.save(f, np.asarray(x))


def np_load(path: Path, model: dict[str, Any]) -> dict[str, Any]:
    with open(path, "rb") as f:
        return {name: jnp.asarray(np.load(f)) for name in model}


def candidates(folder: Path, model: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """Every timed operation, by name; loads read what the saves wrote."""
    like = jax.eval_shape(lambda: model)
    files = {k: folder / f"{k}.bin" for k in ("treenn", "safetensors", "np")}
    return {
        "treenn.save": lambda: treenn.save(files["treenn"], model),
        "safetensors save_file": lambda: safetensors.numpy.save_file(
            numpy_arrays(model), str(files["safetensors"])
        ),
        "np.save": lambda: np_save(files["np"], model),
        "treenn.load": lambda: jax.block_until_ready(treenn.load(files["treenn"], like)),
        "safetensors load_file": lambda: jax.block_until_ready(
            {
                k: jnp.asarray(v)
                for k, v in safetensors.numpy.load_file(files["safetensors"]).items()
            }
        ),
        "np.load": lambda: jax.block_until_ready(np_load(files["np"], model)),
    }


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(size_mib: int, folder: str, name: str) -> None:
    """Measure one candidate's peak extra memory (run in a fresh process, where
    `MALLOC_MMAP_THRESHOLD_` makes every large allocation its own mapping, returned to
    the system when freed: the resident size then counts live memory only)."""
    model = make(size_mib)
    ops = candidates(Path(folder), model)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what model building freed, returned
    before = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak) to the current resident size
    result = ops[name]()
    peak = _rss("VmHWM")
    del result
    print(json.dumps({"extra": peak - before}))


def peak_extra(size_mib: int, folder: Path, name: str) -> int:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            name,
            "--size",
            str(size_mib),
            "--folder",
            str(folder),
        ],
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(out.stdout.splitlines()[-1])["extra"])


def many_tiny(n: int, repeats: int, verdicts: Verdicts) -> None:
    """`treenn.load` of `n` tiny arrays, trainable and frozen, interleaved."""
    model = {f"a{i}": jnp.zeros((2,)) for i in range(n)}
    frozen = treenn.freeze(model)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TREENN_BENCH_DIR")) as tmp:
        files = {"trainable": Path(tmp) / "trainable", "frozen": Path(tmp) / "frozen"}
        treenn.save(files["trainable"], model)
        treenn.save(files["frozen"], frozen)
        loads = {
            f"treenn.load, {n:,} {kind}": (
                lambda kind=kind, like=like: treenn.load(files[kind], like)
            )
            for kind, like in (("trainable", model), ("frozen", frozen))
        }
        times = interleaved(loads, repeats)
    for name, samples in times.items():
        print(f"{name:36} {median(samples) * 1e3:9.0f} ms  {spread(samples)}")
    ratio = median(times[f"treenn.load, {n:,} frozen"]) / median(
        times[f"treenn.load, {n:,} trainable"]
    )
    verdicts.check(
        f"treenn.load of {n:,} tiny frozen arrays <= 1.5x trainable ones",
        ratio <= 1.5,
        f"{ratio:.2f}x",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="model size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--many", type=int, default=24_000, help="tiny arrays to load")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 16 MiB, 1 round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.size, args.folder, args.child)
        return
    if args.tiny:
        args.size, args.repeats, args.many = 16, 1, 2_000
    header(f"checkpoints: save/load of a {args.size} MiB model ({PARTS} big arrays)")
    verdicts = Verdicts(smoke=args.tiny)
    model = make(args.size)
    largest = args.size * MIB // PARTS
    with tempfile.TemporaryDirectory(dir=os.environ.get("TREENN_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        ops = candidates(folder, model)
        saves = {k: v for k, v in ops.items() if "save" in k}
        loads = {k: v for k, v in ops.items() if "load" in k}
        for fn in saves.values():
            fn()  # warm up, and write the files the loads read
        for fn in loads.values():
            fn()
        times = {**interleaved(saves, args.repeats), **interleaved(loads, args.repeats)}
        del model
        extra = {name: peak_extra(args.size, folder, name) for name in ops}
    print(f"{'candidate':24} {'median time':>12} {'GiB/s':>7} {'peak extra memory':>18}")
    gib = args.size / 1024
    for name, samples in times.items():
        t = median(samples)
        print(
            f"{name:24} {t * 1e3:9.0f} ms {gib / t:7.2f} {extra[name] / MIB:14.0f} MiB  "
            f"{spread(samples)}"
        )
    print(f"largest array: {largest / MIB:.0f} MiB; model: {args.size} MiB")
    save_ratio = median(times["treenn.save"]) / median(times["safetensors save_file"])
    load_ratio = median(times["treenn.load"]) / median(times["safetensors load_file"])
    verdicts.check(
        "treenn.save peak extra host memory <= largest array",
        extra["treenn.save"] <= largest + SLACK,
        f"{extra['treenn.save'] / MIB:.0f} MiB (largest array {largest / MIB:.0f} MiB; "
        f"safetensors {extra['safetensors save_file'] / MIB:.0f} MiB, "
        f"np.save {extra['np.save'] / MIB:.0f} MiB)",
    )
    verdicts.check(
        "treenn.load peak extra host memory <= model + largest array",
        extra["treenn.load"] <= args.size * MIB + largest + SLACK,
        f"{extra['treenn.load'] / MIB:.0f} MiB (safetensors "
        f"{extra['safetensors load_file'] / MIB:.0f} MiB, "
        f"np.load {extra['np.load'] / MIB:.0f} MiB)",
    )
    verdicts.check(
        "treenn.save time <= 2x safetensors.numpy.save_file",
        save_ratio <= 2.0,
        f"{save_ratio:.2f}x (np.save: "
        f"{median(times['np.save']) / median(times['safetensors save_file']):.2f}x)",
    )
    verdicts.check(
        "treenn.load time <= 2x safetensors.numpy.load_file",
        load_ratio <= 2.0,
        f"{load_ratio:.2f}x (np.load: "
        f"{median(times['np.load']) / median(times['safetensors load_file']):.2f}x)",
    )
    header(f"checkpoints: treenn.load of {args.many:,} tiny arrays, trainable and frozen")
    many_tiny(args.many, args.repeats, verdicts)


if __name__ == "__main__":
    main()
