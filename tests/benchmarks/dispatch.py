"""Per-step time of training steps: treenn vs raw jax.jit, eqx.filter_jit, nnx.jit.

Two steps, each section in one process, its variants interleaved and checked to give the
same losses first; medians and ratios against raw `jax.jit` over pre-partitioned arrays
(a step with no pytree modules: the least dispatch JAX allows):

1. The MLP step: an 8-layer, 64-wide MLP, batch 32, Adam, the first layer frozen.
   - `treenn.jit`: `treenn.jit` + `treenn.value_and_grad` + optax + `treenn.apply_updates`;
   - `treenn.train_step`: the same step built by `treenn.train_step`;
   - `eqx.filter_jit`: Equinox's idiom (`eqx.partition` + `filter_value_and_grad`);
   - `nnx.jit`: Flax NNX (`nnx.Optimizer` over every layer but the first), when installed.
2. The pinned frozen-backbone ResNet-18 step: `treenn.models.resnet18(10, width=16,
   small_input=True)`, `treenn.freeze_backbone(model, "fc")` (every BatchNorm pinned in
   eval mode), 8x8 images, batch 4, Adam: small, so that dispatch shows. Raw `jax.jit`
   takes the trainable and the frozen arrays as two lists and rebuilds the model inside.

In both, also `treenn.jit`'s plain path (`TREENN_JIT_FAST=0`: no fast paths) and
`treenn.train_step` without each single fast path of `treenn/_jit_fast.py` (`-memo`,
`-tuple_guards`, `-builders`), the same run.

Two timings per variant: sync (`block_until_ready` after every step, so the dispatch cost
is fully exposed) and pipelined (50 steps, one block at the end: how a loop runs).

Run: `python tests/benchmarks/dispatch.py [--rounds 15] [--only mlp|resnet] [--tiny]`.
Target: treenn.jit and treenn.train_step <= 1.05x raw jax.jit, on both steps.
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
import jax.tree_util as jtu
import numpy as np
import optax
from _harness import Verdicts, header, nnx_or_none

import treenn
import treenn.nn as nn
from treenn import _jit, _jit_fast
from treenn.models import resnet18

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


def made(make: Callable[[], Run], *, fast: bool = True, **mechanisms: bool) -> Run:
    """`make()`, its `treenn.jit` functions made on the plain path (`fast=False`) or
    without the fast paths named `False`."""
    was_fast = _jit._set_fast(fast)
    was = _jit_fast._set_mechanisms(**mechanisms)
    try:
        return make()
    finally:
        _jit._set_fast(was_fast)
        _jit_fast._set_mechanisms(**was)


def treenn_variants(make_jit: Callable[[], Run], make_step: Callable[[], Run]) -> dict[str, Run]:
    """`treenn.jit` and `treenn.train_step` as shipped, on the plain path, and
    `train_step` without each single fast path."""
    runs = {"treenn.jit": made(make_jit), "treenn.train_step": made(make_step)}
    runs["plain treenn.jit"] = made(make_jit, fast=False)
    runs["plain train_step"] = made(make_step, fast=False)
    for mechanism in ("memo", "tuple_guards", "builders", "shared_subtrees"):
        runs[f"train_step -{mechanism}"] = made(make_step, **{mechanism: False})
    return runs


def variants(model: MLP, tx: Any, nnx: Any) -> dict[str, Run]:
    runs = {"raw jax.jit": make_raw(model, tx)}
    runs.update(treenn_variants(lambda: make_treenn(model, tx), lambda: make_train_step(model, tx)))
    runs["eqx.filter_jit"] = make_eqx(model, tx)
    if nnx is not None:
        runs["nnx.jit"] = make_nnx(nnx, model, tx)
    return runs


# -- the pinned frozen-backbone ResNet-18 step ----------------------------------------------


def xent(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_treenn_resnet(model: Any, tx: Any) -> Run:
    @treenn.jit
    def step(model, opt, x, y):
        loss, grads = treenn.value_and_grad(xent)(model, x, y)
        updates, opt = tx.update(grads, opt, treenn.trainable(model))
        return treenn.apply_updates(model, updates), opt, loss

    return _looped(step, model, tx.init(treenn.trainable(model)))


def make_train_step_resnet(model: Any, tx: Any) -> Run:
    return _looped(treenn.train_step(xent, tx), model, tx.init(treenn.trainable(model)))


def make_raw_resnet(model: Any, tx: Any) -> Run:
    """`jax.jit` over two lists of arrays, the trainable and the frozen ones (all passed
    every step, as in a real step); the model is rebuilt from them inside the trace."""
    leaves, treedef = jtu.tree_flatten(model)
    trainable = {id(a) for a in jax.tree.leaves(treenn.trainable(model))}
    arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
    train_at = [i for i in arrays if id(leaves[i]) in trainable]
    frozen_at = [i for i in arrays if id(leaves[i]) not in trainable]

    def rebuild(train: list[jax.Array], frozen: list[jax.Array]) -> Any:
        filled = list(leaves)
        for i, a in [*zip(train_at, train), *zip(frozen_at, frozen)]:
            filled[i] = a
        return treedef.unflatten(filled)

    @jax.jit
    def step(train, frozen, opt, x, y):
        loss, grads = jax.value_and_grad(lambda t: xent(rebuild(t, frozen), x, y))(train)
        updates, opt = tx.update(grads, opt, train)
        return optax.apply_updates(train, updates), opt, loss

    train = [leaves[i] for i in train_at]
    frozen = [leaves[i] for i in frozen_at]
    carry = [train, tx.init(train)]

    def run(x: jax.Array, y: jax.Array) -> jax.Array:
        carry[0], carry[1], loss = step(carry[0], frozen, carry[1], x, y)
        return loss

    return run


def resnet_variants(model: Any, tx: Any) -> dict[str, Run]:
    runs = {"raw jax.jit": make_raw_resnet(model, tx)}
    runs.update(
        treenn_variants(
            lambda: make_treenn_resnet(model, tx), lambda: make_train_step_resnet(model, tx)
        )
    )
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


def time_pipelined(run: Run, x: jax.Array, y: jax.Array, n: int) -> tuple[float, float]:
    """Wall time per step, and the main thread's CPU time per step: the dispatch work
    itself (XLA computes on its own threads), which a loaded machine inflates far less
    than wall time."""
    t, cpu = time.perf_counter(), time.thread_time()
    for _ in range(n):
        loss = run(x, y)
    cpu = time.thread_time() - cpu
    loss.block_until_ready()
    return (time.perf_counter() - t) / n, cpu / n


# `{variant: (sync, pipelined, main-thread CPU)}`: seconds per step, medians over rounds
Results = dict[str, tuple[float, float, float]]


def compare_mlp(
    width: int, depth: int, batch: int, *, rounds: int, steps: int, nnx: Any
) -> Results:
    key = jax.random.key(0)
    model = MLP(width, depth, key=key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, width))
    y = jax.random.normal(jax.random.fold_in(key, 2), (batch, width))
    return compare(variants(model, optax.adam(1e-3), nnx), x, y, rounds=rounds, steps=steps)


def compare_resnet(size: int, batch: int, *, rounds: int, steps: int) -> Results:
    key = jax.random.key(0)
    model = resnet18(10, width=16, small_input=True, key=key)
    model = treenn.freeze_backbone(model, "fc")
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, size, size, 3))
    y = jnp.arange(batch) % 10
    return compare(resnet_variants(model, optax.adam(1e-3)), x, y, rounds=rounds, steps=steps)


def compare(
    runs: dict[str, Run], x: jax.Array, y: jax.Array, *, rounds: int, steps: int
) -> Results:
    """`{variant: (sync seconds, pipelined seconds)}`, medians over `rounds` rounds."""
    check_same(runs, x, y)
    for run in runs.values():  # compile and warm up
        for _ in range(20):
            run(x, y).block_until_ready()
    sync: dict[str, list[float]] = {name: [] for name in runs}
    piped: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name, median in time_sync(runs, x, y, steps).items():
            sync[name].append(median)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, thread = time_pipelined(runs[name], x, y, steps)
            piped[name].append(wall)
            cpu[name].append(thread)
    return {
        name: (
            statistics.median(sync[name]),
            statistics.median(piped[name]),
            statistics.median(cpu[name]),
        )
        for name in runs
    }


def report(results: Results, verdicts: Verdicts, label: str) -> None:
    print(
        f"{'variant':24} {'sync us':>9} {'ratio':>6} {'pipelined us':>13} {'ratio':>6} "
        f"{'main-thread CPU us':>19} {'ratio':>6}"
    )
    base_s, base_p, base_c = results["raw jax.jit"]
    for name, (s, p, c) in results.items():
        print(
            f"{name:24} {s * 1e6:9.1f} {s / base_s:6.3f} {p * 1e6:13.1f} {p / base_p:6.3f} "
            f"{c * 1e6:19.1f} {c / base_c:6.3f}"
        )
    for name in ("treenn.jit", "treenn.train_step"):
        s, p, c = results[name]
        print(
            f"{name} - raw: {(s - base_s) * 1e6:+.1f} us per step blocking, "
            f"{(p - base_p) * 1e6:+.1f} us pipelined, {(c - base_c) * 1e6:+.1f} us main-thread CPU"
        )
    step_s, step_p, step_c = results["treenn.train_step"]
    for name in results:
        s, p, c = results[name]
        if name.startswith("plain "):
            print(
                f"{name}: {s / base_s:.3f}x raw blocking, {p / base_p:.3f}x pipelined, "
                f"{c / base_c:.3f}x main-thread CPU"
            )
        if name.startswith("train_step -"):
            print(
                f"{name}: {(s - step_s) * 1e6:+.1f} us blocking, {(p - step_p) * 1e6:+.1f} us "
                f"pipelined, {(c - step_c) * 1e6:+.1f} us main-thread CPU, against train_step"
            )
    for name in ("treenn.jit", "treenn.train_step"):
        s, p, _ = results[name]
        verdicts.check(
            f"{label}: {name} <= 1.05x raw jax.jit",
            s / base_s <= 1.05 and p / base_p <= 1.05,
            f"{s / base_s:.3f}x blocking each step, {p / base_p:.3f}x pipelined",
        )


def main(argv: list[str] | None = None) -> Verdicts:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", choices=["mlp", "resnet"], help="one of the two steps")
    parser.add_argument("--tiny", action="store_true", help="a quick smoke run, no timing value")
    args = parser.parse_args(argv)
    rounds, steps = (2, 5) if args.tiny else (args.rounds, args.steps)
    verdicts = Verdicts(smoke=args.tiny)
    if args.only in (None, "mlp"):
        header(f"MLP training step, 8x64, batch 32, Adam, layer 0 frozen ({rounds} rounds)")
        results = compare_mlp(64, 8, 32, rounds=rounds, steps=steps, nnx=nnx_or_none())
        report(results, verdicts, "CPU MLP step")
    if args.only in (None, "resnet"):
        header(
            "pinned frozen-backbone ResNet-18 step (width 16), 8x8 images, batch 4, Adam "
            f"({rounds} rounds)"
        )
        results = compare_resnet(8, 4, rounds=rounds, steps=steps)
        report(results, verdicts, "CPU pinned ResNet-18 step")
    return verdicts


if __name__ == "__main__":
    main()
