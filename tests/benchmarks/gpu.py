"""Every GPU benchmark in one run of a few minutes (one device call).

1. Training throughput, bf16 (parameters, activations and Adam moments in bfloat16;
   BatchNorm statistics float32, as treenn's layers keep them): ResNet-50 and ViT-S/16,
   224x224, `treenn.train_step` against the same model hand-written in plain JAX under
   `jax.jit` (`_handwritten.py`, the same weights, checked to give the same loss).
2. MLP training steps (float32, Adam, layer 0 frozen), dispatch-bound: the small one of
   `dispatch.py` (8x64, batch 32) and a mid-size one (8x1024, batch 1024), treenn against
   raw `jax.jit`, `eqx.filter_jit` and `nnx.jit` (when flax is installed).

Each comparison runs in this one process, interleaved, and prints medians and ratios.
`--tiny` runs everything at toy sizes (on CPU too) to check the script itself.

Run: `python tests/benchmarks/gpu.py [--only resnet50 vit_s mlp] [--tiny]`. Targets:
treenn throughput >= 0.98x hand-written; MLP steps <= 1.05x raw `jax.jit`.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

import _handwritten as hw
import dispatch
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _harness import Verdicts, header, interleaved, median, nnx_or_none

import treenn
from treenn.models import resnet50, vit_small

DTYPE = jnp.bfloat16


class Model:
    """A zoo model, its hand-written twin, and a batch."""

    def __init__(self, name: str, *, tiny: bool, batch: int):
        key = jax.random.key(0)
        self.name = name
        self.model: Any
        self.forward: hw.Forward
        self.options: dict[str, Any]
        if name == "resnet50":
            size = 32 if tiny else 224
            self.model = resnet50(1000, width=8 if tiny else 64, key=key)
            self.forward, self.options = hw.resnet, {"train": True}
        else:
            size = 32 if tiny else 224
            depth = 2 if tiny else 12
            self.model = vit_small(1000, img_size=size, patch_size=16, depth=depth, key=key)
            self.forward, self.options = hw.vit, {"heads": 6}
        self.model = hw.cast(self.model, DTYPE)
        self.batch = batch
        self.x = jax.random.normal(jax.random.fold_in(key, 1), (batch, size, size, 3), DTYPE)
        self.y = jax.random.randint(jax.random.fold_in(key, 2), (batch,), 0, 1000)


def runners(m: Model, tx: Any) -> dict[str, Callable[[int], jax.Array]]:
    """`run(n) -> last loss`: `n` training steps, blocking at the end, for each variant;
    both start from the same weights and optimiser state."""
    params, buffers = hw.arrays_of(m.model)
    raw = jax.jit(hw.train_step(m.forward, tx, **m.options))
    raw_state = [params, buffers, tx.init(params)]

    def run_raw(n: int) -> jax.Array:
        for _ in range(n):
            *state, loss = raw(*raw_state, m.x, m.y)
            raw_state[:] = state
        return loss.block_until_ready()

    step = treenn.train_step(hw.xent, tx)
    state = [m.model, tx.init(treenn.trainable(m.model))]

    def run_treenn(n: int) -> jax.Array:
        for _ in range(n):
            state[0], state[1], loss = step(state[0], state[1], m.x, m.y)
        return loss.block_until_ready()

    return {"hand-written jax.jit": run_raw, "treenn.train_step": run_treenn}


def throughput(m: Model, rounds: int, steps: int, verdicts: Verdicts) -> None:
    tx = optax.adam(1e-4)
    start = time.perf_counter()
    runs = runners(m, tx)
    # The first step compiles, and shows that both compute the same loss.
    first = {name: float(run(1)) for name, run in runs.items()}
    np.testing.assert_allclose(first["treenn.train_step"], first["hand-written jax.jit"], rtol=2e-2)
    for run in runs.values():  # warm up
        run(2)
    ready = time.perf_counter()
    timed = {name: functools.partial(run, steps) for name, run in runs.items()}
    times = interleaved(timed, rounds)
    rate = {name: m.batch * steps / median(ts) for name, ts in times.items()}
    base = rate["hand-written jax.jit"]
    print(f"-- {m.name}, batch {m.batch}, bf16 (compile {ready - start:.0f} s)")
    for name, r in rate.items():
        print(f"{name:22} {r:10.1f} images/s {r / base:7.3f}x")
    ratio = rate["treenn.train_step"] / base
    verdicts.check(
        f"{m.name} bf16 training throughput >= 0.98x hand-written", ratio >= 0.98, f"{ratio:.3f}x"
    )


def main(argv: list[str] | None = None) -> Verdicts:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["resnet50", "vit_s", "mlp"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per throughput sample")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the script")
    args = parser.parse_args(argv)
    tiny = args.tiny
    batch, rounds, steps = (4, 2, 2) if tiny else (args.batch, args.rounds, args.steps)
    header(f"GPU benchmarks{' (tiny sizes: a smoke run)' if tiny else ''}")
    verdicts = Verdicts(smoke=tiny)
    start = time.perf_counter()
    for name in ("resnet50", "vit_s"):
        if name in args.only:
            throughput(Model(name, tiny=tiny, batch=batch), rounds, steps, verdicts)
            print(f"   ({time.perf_counter() - start:.0f} s so far)", flush=True)
    if "mlp" in args.only:
        nnx = nnx_or_none()
        sizes = [(64, 32), (128, 64)] if tiny else [(64, 32), (1024, 1024)]
        for width, mlp_batch in sizes:
            print(f"-- MLP 8x{width}, batch {mlp_batch}, Adam, layer 0 frozen, float32")
            results = dispatch.compare(
                width, 8, mlp_batch, rounds=rounds * 2, steps=steps * 10, nnx=nnx
            )
            dispatch.report(results, verdicts, f"GPU MLP 8x{width} batch {mlp_batch}")
            print(f"   ({time.perf_counter() - start:.0f} s so far)", flush=True)
    return verdicts


if __name__ == "__main__":
    main()
