"""Per-step time of a training step: treenn vs raw jax.jit vs eqx.filter_jit (CPU).

8-layer, 64-wide MLP, batch 32, Adam, the first layer frozen. All three run in one
process, interleaved in rounds, and the script prints medians and ratios against raw
`jax.jit` over pre-partitioned arrays (a hand-written step with no pytree modules).

Two timings per variant:
- sync: `block_until_ready` after every step (dispatch overhead fully exposed);
- pipelined: 50 steps, one block at the end (how a training loop runs).

Run: `python tests/benchmarks/dispatch.py [--rounds 15]`. Target: treenn <= 1.05x raw.
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import treenn
import treenn.nn as nn

WIDTH, DEPTH, BATCH = 64, 8, 32


class MLP(treenn.Module):
    layers: tuple[nn.Linear, ...]

    def __init__(self, *, key: jax.Array):
        keys = jax.random.split(key, DEPTH)
        self.layers = tuple(nn.Linear(WIDTH, WIDTH, key=k) for k in keys)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def make_treenn(model, tx):
    model = treenn.freeze(model, "layers.0")
    opt = tx.init(treenn.trainable(model))

    @treenn.jit
    def step(model, opt, x, y):
        loss, grads = treenn.value_and_grad(mse)(model, x, y)
        updates, opt = tx.update(grads, opt, treenn.trainable(model))
        return treenn.apply_updates(model, updates), opt, loss

    state = [model, opt]

    def run(x, y):
        state[0], state[1], loss = step(state[0], state[1], x, y)
        return loss

    return run


def make_eqx(model, tx):
    frozen = lambda m: m.layers[0]  # noqa: E731
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = eqx.tree_at(frozen, params, replace_fn=lambda _: None)
    opt = tx.init(params)

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

    state = [model, opt]

    def run(x, y):
        state[0], state[1], loss = step(state[0], state[1], x, y)
        return loss

    return run


def make_raw(model, tx):
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

    state = [train, opt]

    def run(x, y):
        state[0], state[1], loss = step(state[0], frozen, state[1], x, y)
        return loss

    return run


def time_sync(runs, x, y, n):
    """Median per-step time of each variant, the variants interleaved step by step so
    that the machine's drift affects them alike."""
    times = {name: [] for name in runs}
    names = list(runs)
    for i in range(n):
        # Rotate the order each step: a variant's position in the interleave matters.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t = time.perf_counter()
            runs[name](x, y).block_until_ready()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_pipelined(run, x, y, n):
    t = time.perf_counter()
    for _ in range(n):
        loss = run(x, y)
    loss.block_until_ready()
    return (time.perf_counter() - t) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    key = jax.random.key(0)
    model = MLP(key=key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (BATCH, WIDTH))
    y = jax.random.normal(jax.random.fold_in(key, 2), (BATCH, WIDTH))
    tx = optax.adam(1e-3)
    runs = {
        "raw jax.jit": make_raw(model, tx),
        "treenn.jit": make_treenn(model, tx),
        "eqx.filter_jit": make_eqx(model, tx),
    }
    for run in runs.values():  # compile and warm up
        for _ in range(20):
            run(x, y).block_until_ready()
    sync = {name: [] for name in runs}
    piped = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, median in time_sync(runs, x, y, args.steps).items():
            sync[name].append(median)
        for name, run in runs.items():
            piped[name].append(time_pipelined(run, x, y, args.steps))
    print(
        f"jax {jax.__version__}, equinox {eqx.__version__}, CPU, {DEPTH}x{WIDTH} MLP, "
        f"batch {BATCH}, Adam, layer 0 frozen"
    )
    print(f"{'variant':16} {'sync us':>9} {'ratio':>6} {'pipelined us':>13} {'ratio':>6}")
    base_s = statistics.median(sync["raw jax.jit"])
    base_p = statistics.median(piped["raw jax.jit"])
    for name in runs:
        s, p = statistics.median(sync[name]), statistics.median(piped[name])
        print(f"{name:16} {s * 1e6:9.1f} {s / base_s:6.3f} {p * 1e6:13.1f} {p / base_p:6.3f}")


if __name__ == "__main__":
    main()
