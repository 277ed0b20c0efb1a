"""Per-step time of an MLP training step: treenn vs raw jax.jit, eqx.filter_jit, nnx.jit.

The issue's step: an 8-layer, 64-wide MLP, batch 32, Adam, the first layer frozen. Five
variants train the very same model (the same initial weights, checked to give the same
losses) in one process, interleaved, and the script prints medians and ratios against
raw `jax.jit` over pre-partitioned arrays (a hand-written step with no pytree modules):

- `treenn.jit`: `treenn.jit` + `treenn.value_and_grad` + optax + `treenn.apply_updates`;
- `treenn.train_step`: the same step built by `treenn.train_step`;
- `eqx.filter_jit`: Equinox's idiom (`eqx.partition` + `filter_value_and_grad`);
- `nnx.jit`: Flax NNX (`nnx.Optimizer` over every layer but the first), when installed.

Two timings per variant: sync (`block_until_ready` after every step, so the dispatch cost
is fully exposed) and pipelined (50 steps, one block at the end: how a loop runs).

Run: `python tests/benchmarks/dispatch.py [--rounds 15] [--tiny]`.
Target: treenn <= 1.05x raw jax.jit.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _harness import Verdicts, header, nnx_or_none

import treenn
import treenn.nn as nn

Run = Callable[[jax.Array, jax.Array], jax.Array]


class MLP(treenn.Module):
    layers: tuple[nn.Linear, ...]

    def __init__(self, width: int, depth: int, *, key: jax.Array):
        keys = jax.random.split(key, depth)
        self.layers = tuple(nn.Linear(width, width, key=k) for k in keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def mse(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


def _looped(step: Callable[..., Any], *state: Any) -> Run:
    """`run(x, y) -> loss`, carrying `(model, opt_state)` from step to step."""
    carry = list(state)

    def run(x: jax.Array, y: jax.Array) -> jax.Array:
        carry[0], carry[1], loss = step(carry[0], carry[1], x, y)
        return loss

    return run


def make_treenn(model: MLP, tx: Any) -> Run:
    model = treenn.freeze(model, "layers.0")
    opt = tx.init(treenn.trainable(model))

    @treenn.jit
    def step(model, opt, x, y):
        loss, grads = treenn.value_and_grad(mse)(model, x, y)
        updates, opt = tx.update(grads, opt, treenn.trainable(model))
        return treenn.apply_updates(model, updates), opt, loss

    return _looped(step, model, opt)


def make_train_step(model: MLP, tx: Any) -> Run:
    model = treenn.freeze(model, "layers.0")
    return _looped(treenn.train_step(mse, tx), model, tx.init(treenn.trainable(model)))


def make_eqx(model: MLP, tx: Any) -> Run:
    frozen = lambda m: m.layers[0]
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    opt = tx.init(eqx.tree_at(frozen, params, replace_fn=lambda _: None))

    def loss_fn(params, model, x, y):
        return mse(eqx.combine(params, model), x, y)

    @eqx.filter_jit
    def step(model, opt, x, y):
        params = eqx.tree_at(
            frozen, eqx.filter(model, eqx.is_inexact_array), replace_fn=lambda _: None
        )
        loss, grads = eqx.filter_value_and_grad(loss_fn)(params, model, x, y)
        updates, opt = tx.update(grads, opt, params)
        return eqx.apply_updates(model, updates), opt, loss

    return _looped(step, model, opt)


def make_raw(model: MLP, tx: Any) -> Run:
    arrays = [(layer.weight, layer.bias) for layer in model.layers]
    frozen, train = arrays[:1], arrays[1:]
    opt = tx.init(train)

    def loss_fn(train, frozen, x, y):
        h = x
        layers = frozen + train
        for i, (w, b) in enumerate(layers):
            h = h @ w.T + b[None]
            if i < len(layers) - 1:
                h = jax.nn.relu(h)
        return jnp.mean((h - y) ** 2)

    @jax.jit
    def step(train, frozen, opt, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(train, frozen, x, y)
        updates, opt = tx.update(grads, opt, train)
        return optax.apply_updates(train, updates), opt, loss

    carry = [train, opt]

    def run(x: jax.Array, y: jax.Array) -> jax.Array:
        # The frozen arrays are an argument of the compiled step, as in a real one.
        carry[0], carry[1], loss = step(carry[0], frozen, carry[1], x, y)
        return loss

    return run


def make_nnx(nnx: Any, model: MLP, tx: Any) -> Run:
    class NnxMLP(nnx.Module):
        def __init__(self, source: MLP):
            width = source.layers[0].in_features
            rngs = nnx.Rngs(0)
            self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in source.layers])
            for mine, theirs in zip(self.layers, source.layers):  # the same initial weights
                mine.kernel.value = theirs.weight.T
                mine.bias.value = theirs.bias

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = jax.nn.relu(layer(x))
            return self.layers[-1](x)

    net = NnxMLP(model)
    # Every parameter but layer 0's: `layers.0` is the only path holding the key 0.
    wrt = nnx.All(nnx.Param, nnx.Not(nnx.PathContains(0)))
    opt = nnx.Optimizer(net, tx, wrt=wrt)

    @nnx.jit
    def step(net, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda net: mse(net, x, y), argnums=nnx.DiffState(0, wrt))(
            net
        )
        opt.update(net, grads)
        return loss

    return lambda x, y: step(net, opt, x, y)


def variants(model: MLP, tx: Any, nnx: Any) -> dict[str, Run]:
    runs = {
        "raw jax.jit": make_raw(model, tx),
        "treenn.jit": make_treenn(model, tx),
        "treenn.train_step": make_train_step(model, tx),
        "eqx.filter_jit": make_eqx(model, tx),
    }
    if nnx is not None:
        runs["nnx.jit"] = make_nnx(nnx, model, tx)
    return runs


def check_same(runs: dict[str, Run], x: jax.Array, y: jax.Array, steps: int = 3) -> None:
    """Every variant computes the same training run (else the timings compare apples
    with pears): equal losses over the first steps."""
    losses = {name: [float(run(x, y)) for _ in range(steps)] for name, run in runs.items()}
    reference = losses["raw jax.jit"]
    for name, values in losses.items():
        if not np.allclose(values, reference, rtol=1e-4, atol=1e-6):
            raise AssertionError(f"{name} trains differently: losses {values} vs raw {reference}")
    if not reference[-1] < reference[0]:
        raise AssertionError(f"the loss does not decrease: {reference}")


def time_sync(runs: dict[str, Run], x: jax.Array, y: jax.Array, n: int) -> dict[str, float]:
    """Median per-step time of each variant, blocking every step; the variants are
    interleaved step by step, the order rotating, so drift affects them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(n):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t = time.perf_counter()
            runs[name](x, y).block_until_ready()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_pipelined(run: Run, x: jax.Array, y: jax.Array, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        loss = run(x, y)
    loss.block_until_ready()
    return (time.perf_counter() - t) / n


def compare(
    width: int, depth: int, batch: int, *, rounds: int, steps: int, nnx: Any
) -> dict[str, tuple[float, float]]:
    """`{variant: (sync seconds, pipelined seconds)}`, medians over `rounds` rounds."""
    key = jax.random.key(0)
    model = MLP(width, depth, key=key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, width))
    y = jax.random.normal(jax.random.fold_in(key, 2), (batch, width))
    runs = variants(model, optax.adam(1e-3), nnx)
    check_same(runs, x, y)
    for run in runs.values():  # compile and warm up
        for _ in range(20):
            run(x, y).block_until_ready()
    sync: dict[str, list[float]] = {name: [] for name in runs}
    piped: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name, median in time_sync(runs, x, y, steps).items():
            sync[name].append(median)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            piped[name].append(time_pipelined(runs[name], x, y, steps))
    return {name: (statistics.median(sync[name]), statistics.median(piped[name])) for name in runs}


def report(results: dict[str, tuple[float, float]], verdicts: Verdicts, label: str) -> None:
    print(f"{'variant':18} {'sync us':>9} {'ratio':>6} {'pipelined us':>13} {'ratio':>6}")
    base_s, base_p = results["raw jax.jit"]
    for name, (s, p) in results.items():
        print(f"{name:18} {s * 1e6:9.1f} {s / base_s:6.3f} {p * 1e6:13.1f} {p / base_p:6.3f}")
    for name in ("treenn.jit", "treenn.train_step"):
        s, p = results[name]
        print(
            f"{name} - raw: {(s - base_s) * 1e6:+.1f} us per step blocking, "
            f"{(p - base_p) * 1e6:+.1f} us pipelined"
        )
    for name in ("treenn.jit", "treenn.train_step"):
        s, p = results[name]
        verdicts.check(
            f"{label}: {name} <= 1.05x raw jax.jit",
            s / base_s <= 1.05 and p / base_p <= 1.05,
            f"{s / base_s:.3f}x blocking each step, {p / base_p:.3f}x pipelined",
        )


def main(argv: list[str] | None = None) -> Verdicts:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="a quick smoke run, no timing value")
    args = parser.parse_args(argv)
    rounds, steps = (2, 5) if args.tiny else (args.rounds, args.steps)
    header(f"MLP training step, 8x64, batch 32, Adam, layer 0 frozen ({rounds} rounds)")
    results = compare(64, 8, 32, rounds=rounds, steps=steps, nnx=nnx_or_none())
    verdicts = Verdicts(smoke=args.tiny)
    report(results, verdicts, "CPU MLP step")
    return verdicts


if __name__ == "__main__":
    main()
