"""Activation checkpointing: what `treenn.remat` saves for the backward pass, and costs.

A 12-block transformer-style MLP stack (each block `x + down(gelu(up(layer_norm(x))))`,
width 256, hidden 1024, 8 sequences of 128 tokens), every block selected
(`treenn.remat(model, "blocks.*")`) against none, in one process:

- saved residuals: the arrays the VJP keeps from the forward pass for the backward pass
  (the residual outputs of `jax.vjp`'s jaxpr, as `jax.ad_checkpoint.print_saved_residuals`
  lists them), split into arrays the step holds anyway (weights, the input: no memory of
  their own) and computed activations, the part remat cuts. Target: activations cut >= 3x.
- step time: a `treenn.jit`-compiled SGD training step, timed interleaved. Target <= 1.35x
  (Chen et al.'s +30% for recomputing the forward pass once).
- XLA's compiled temporaries (`memory_analysis().temp_size_in_bytes`) of the step. XLA
  on CPU schedules an unrolled stack's recomputation so that it does not lower the peak:
  printed for the record, not a target.

The same is printed for `policy=jax.checkpoint_policies.dots_saveable` (matrix products
kept, the rest recomputed).

Run: `python tests/benchmarks/remat.py [--tiny] [--rounds 15]`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from typing import Any

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
from _harness import Verdicts, header, interleaved, median, spread
from jax.extend.core import Literal

import treenn
import treenn.nn as nn


class Block(treenn.Module):
    norm: nn.LayerNorm
    up: nn.Linear
    down: nn.Linear

    def __init__(self, dim: int, hidden: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden, key=k1)
        self.down = nn.Linear(hidden, dim, key=k2)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class Stack(treenn.Module):
    blocks: list[Block]
    head: nn.Linear

    def __init__(self, depth: int, dim: int, hidden: int, *, key: jax.Array):
        keys = jax.random.split(key, depth + 1)
        self.blocks = [Block(dim, hidden, key=k) for k in keys[:depth]]
        self.head = nn.Linear(dim, 1, key=keys[-1])

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def loss(model: Any, x: jax.Array) -> jax.Array:
    return jnp.mean(model(x) ** 2)


def residuals(model: Any, x: jax.Array) -> tuple[int, int, int]:
    """`(bytes of computed activations, bytes of the model's own arrays, count)` that
    `jax.vjp` of the loss (by the trainable arrays) keeps for the backward pass."""
    params, rest = treenn.partition(model)

    def f(p: Any, x: jax.Array) -> Any:
        return jax.vjp(lambda q: loss(treenn.combine(q, rest), x), p)

    closed, shapes = jax.make_jaxpr(f, return_shape=True)(params, x)
    jaxpr = closed.jaxpr
    n = len(jax.tree_util.tree_leaves(shapes[1]))
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    computed = own = 0
    seen: set[Any] = set()
    for var in jaxpr.outvars[len(jaxpr.outvars) - n :]:
        if isinstance(var, Literal) or var in seen:  # a constant; a var kept twice
            continue
        seen.add(var)
        size = int(np.prod(var.aval.shape)) * var.aval.dtype.itemsize
        if var in inputs:
            own += size
        else:
            computed += size
    return computed, own, len(seen)


def listed_residual_bytes(model: Any, x: jax.Array) -> int:
    """The computed residuals' bytes as `jax.ad_checkpoint.print_saved_residuals` lists
    them (a cross-check of `residuals`)."""
    params, rest = treenn.partition(model)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(lambda p: loss(treenn.combine(p, rest), x), params)
    total = 0
    sizes = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "i32": 4, "bool": 1}
    for line in out.getvalue().splitlines():
        if "from the argument" in line or "from a literal" in line or "from a constant" in line:
            continue
        m = re.match(r"(\w+)\[([\d,]*)\]", line)
        if m:
            shape = [int(d) for d in m[2].split(",") if d]
            total += int(np.prod(shape)) * sizes[m[1]]
    return total


def make_step() -> Any:
    @treenn.jit
    def step(model: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        value, grads = treenn.value_and_grad(loss)(model, x)
        updates = jax.tree_util.tree_map(lambda g: -1e-3 * g, grads)
        return treenn.apply_updates(model, updates), value

    return step


def temp_bytes(model: Any, x: jax.Array) -> int | None:
    params, rest = treenn.partition(model)

    def step(p: Any, x: jax.Array) -> Any:
        return jax.grad(lambda q: loss(treenn.combine(q, rest), x))(p)

    analysis = jax.jit(step).lower(params, x).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke run at toy sizes")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    depth, dim, hidden, batch, seq = (12, 256, 1024, 8, 128) if not args.tiny else (12, 8, 32, 2, 4)
    rounds = 3 if args.tiny else args.rounds
    verdicts = Verdicts(smoke=args.tiny)
    header("treenn.remat: saved residuals and step time")
    print(
        f"{depth} blocks x + down(gelu(up(layer_norm(x)))), width {dim}, hidden {hidden}, "
        f"input {batch}x{seq}x{dim} float32"
    )

    key = jax.random.key(0)
    model = Stack(depth, dim, hidden, key=key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, seq, dim))
    variants = {
        "none": model,
        "remat": treenn.remat(model, "blocks.*"),
        "remat dots_saveable": treenn.remat(
            model, "blocks.*", policy=jax.checkpoint_policies.dots_saveable
        ),
    }

    # The variants compute the same thing.
    ref = treenn.grad(loss)(model, x)
    for variant in variants.values():
        grads = treenn.grad(loss)(variant, x)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)

    saved = {}
    print("\nresiduals kept for the backward pass (jax.vjp of the loss):")
    for name, variant in variants.items():
        computed, own, count = residuals(variant, x)
        listed = listed_residual_bytes(variant, x)
        assert listed == computed, (name, listed, computed)  # the two counts agree
        saved[name] = computed
        print(
            f"  {name:<20} activations {mib(computed):>11} ({count} arrays in all), "
            f"and arrays the step holds anyway (weights, input) {mib(own)}"
        )

    steps = {name: make_step() for name in variants}
    for name, variant in variants.items():  # compile outside the timing
        jax.block_until_ready(steps[name](variant, x))
    fns = {
        name: (lambda s=steps[name], v=variant: jax.block_until_ready(s(v, x)))
        for name, variant in variants.items()
    }
    times = interleaved(fns, rounds)
    temps = {name: temp_bytes(variant, x) for name, variant in variants.items()}
    print(f"\ntraining step (treenn.jit, SGD), median of {rounds} interleaved rounds:")
    for name in variants:
        ratio = median(times[name]) / median(times["none"])
        temp = temps[name]
        print(
            f"  {name:<20} {median(times[name]) * 1e3:8.1f} ms {spread(times[name])}"
            f"  {ratio:.2f}x   XLA temporaries {mib(temp) if temp is not None else 'n/a'}"
        )

    for name in ("remat", "remat dots_saveable"):
        cut = saved["none"] / saved[name]
        ratio = median(times[name]) / median(times["none"])
        print(f"\n{name}: activations cut {cut:.2f}x, step time {ratio:.2f}x")
    cut = saved["none"] / saved["remat"]
    ratio = median(times["remat"]) / median(times["none"])
    verdicts.check("remat of every block cuts the saved activations >= 3x", cut >= 3, f"{cut:.2f}x")
    verdicts.check("remat of every block: step time <= 1.35x", ratio <= 1.35, f"{ratio:.2f}x")


if __name__ == "__main__":
    main()
