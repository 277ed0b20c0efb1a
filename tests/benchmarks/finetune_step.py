"""Fine-tuning steps on a small ResNet (CPU): what freezing saves.

A ResNet-18 of width 16 (`treenn.models.resnet18(10, width=16, small_input=True)`),
32x32 images, batch 32, Adam, `treenn.train_step`. Timed in one process, interleaved:

- the eval-mode forward of the same model (`treenn.eval_step`): the floor;
- the full step (everything trainable, BatchNorm in training mode);
- the first half frozen (`conv1`, `bn1`, `layer1`, `layer2`);
- the frozen backbone (`treenn.freeze_backbone(model, "fc")`: only `fc` trains);
- the forward of the first half alone, for reference: the weight-gradient work of a
  convolution equals its forward work, so this is what freezing that half must save at
  least (it also saves the half's input-gradient work).

Besides times, XLA's own FLOP counts of each compiled step (`treenn.jit(...).lower`), and
the Adam state's bytes against the trainable bytes (frozen arrays get no state).

Run: `python tests/benchmarks/finetune_step.py [--rounds 15] [--tiny]`. Targets: frozen-
backbone step <= 1.2x the forward; the half-frozen step saves at least the frozen half's
weight-gradient work; Adam state bytes exactly 2x the trainable bytes.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _harness import Verdicts, header, interleaved, median, spread

import treenn
from treenn.models import resnet18


def xent(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def first_half(model: Any, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(model.bn1(model.conv1(x)))
    for block in (*model.layer1, *model.layer2):
        x = block(x)
    return x


FIRST_HALF = lambda m: (m.conv1, m.bn1, m.layer1, m.layer2)


def nbytes(tree: Any, *, inexact: bool = True) -> int:
    """Bytes of the floating-point arrays of `tree` (or, `inexact=False`, of the others)."""
    leaves = jax.tree.leaves(tree)
    return sum(x.nbytes for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact) == inexact)


class Trainer:
    """One training variant: its step, model and optimiser state, carried along."""

    def __init__(self, model: Any, tx: Any):
        self.step: Any = treenn.train_step(xent, tx)
        self.model = model
        self.opt = tx.init(treenn.trainable(model))
        self.start = model

    def run(self, x: jax.Array, y: jax.Array, n: int) -> None:
        for _ in range(n):
            self.model, self.opt, loss = self.step(self.model, self.opt, x, y)
        loss.block_until_ready()

    def flops(self, x: jax.Array, y: jax.Array) -> float:
        return flops(self.step.lower(self.model, self.opt, x, y))

    def state_bytes(self) -> tuple[int, int, int]:
        """Bytes of the optimiser state's moments and of its other arrays (the step
        count), and bytes of the trainable arrays."""
        trainable = nbytes(treenn.trainable(self.model))
        return nbytes(self.opt), nbytes(self.opt, inexact=False), trainable


def flops(lowered: Any) -> float:
    return float(lowered.compile().cost_analysis()["flops"])


def unchanged(before: Any, after: Any, where: Any, *, buffers: bool = True) -> bool:
    """Whether every array under `where` (parameters, and buffers unless told not to)
    is bit-identical in the two models."""

    def pick(tree: Any) -> list[Any]:
        if not buffers:  # the parameters only: what would train if unfrozen
            tree = treenn.trainable(treenn.unfreeze(tree))
        # Arrays only: `inference` flags are leaves too, and the trained model's modes differ.
        return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]

    a, b = pick(where(before)), pick(where(after))
    return all(np.array_equal(u, v) for u, v in zip(a, b))


def main(argv: list[str] | None = None) -> Verdicts:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--tiny", action="store_true", help="a quick smoke run, no timing value")
    args = parser.parse_args(argv)
    size, batch, rounds, inner = (8, 4, 2, 1) if args.tiny else (32, 32, args.rounds, args.inner)
    header(
        f"Fine-tuning steps, ResNet-18 width 16, {size}x{size} images, batch {batch}, Adam "
        f"(median of {rounds} x {inner} steps, interleaved)"
    )
    key = jax.random.key(0)
    model = resnet18(10, width=16, small_input=True, key=key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, size, size, 3))
    y = jax.random.randint(jax.random.fold_in(key, 2), (batch,), 0, 10)
    tx = optax.adam(1e-3)
    trainers = {
        "full step": Trainer(model, tx),
        "first half frozen": Trainer(treenn.freeze(model, FIRST_HALF), tx),
        "frozen backbone": Trainer(treenn.freeze_backbone(model, "fc"), tx),
    }
    forward: Any = treenn.eval_step(lambda m, x: m(x))
    half_forward: Any = treenn.eval_step(first_half)

    def forwards(fn: Callable[..., Any], n: int) -> None:
        for _ in range(n):
            out = fn(model, x)
        out.block_until_ready()

    fns: dict[str, Callable[[], Any]] = {
        "eval forward (floor)": lambda: forwards(forward, inner),
        **{name: functools.partial(t.run, x, y, inner) for name, t in trainers.items()},
        "first-half forward": lambda: forwards(half_forward, inner),
    }
    for fn in fns.values():  # compile and warm up
        fn()
        fn()
    times = interleaved(fns, rounds)
    ms = {name: median(ts) / inner * 1e3 for name, ts in times.items()}
    spreads = {name: spread(ts, inner) for name, ts in times.items()}
    gflops = {name: t.flops(x, y) / 1e9 for name, t in trainers.items()}
    gflops["eval forward (floor)"] = flops(forward.lower(model, x)) / 1e9
    gflops["first-half forward"] = flops(half_forward.lower(model, x)) / 1e9

    floor, full = ms["eval forward (floor)"], ms["full step"]
    print(
        f"{'variant':22} {'median ms':>10} {'vs forward':>11} {'vs full':>8} {'XLA GFLOP':>10} "
        "interquartile"
    )
    for name in fns:
        print(
            f"{name:22} {ms[name]:10.2f} {ms[name] / floor:11.3f} {ms[name] / full:8.3f} "
            f"{gflops[name]:10.3f} {spreads[name]}"
        )

    # The steps did train, and left frozen arrays (and pinned statistics) bit-identical.
    t = trainers
    assert not unchanged(model, t["full step"].model, lambda m: m.layer1)
    # (Its BatchNorms are in training mode: their running statistics do move.)
    assert unchanged(model, t["first half frozen"].model, FIRST_HALF, buffers=False)
    assert not unchanged(model, t["first half frozen"].model, lambda m: m.layer4)
    assert unchanged(model, t["frozen backbone"].model, lambda m: (m.bn1, m.layer4))
    assert not unchanged(model, t["frozen backbone"].model, lambda m: m.fc)

    verdicts = Verdicts(smoke=args.tiny)
    ratio = ms["frozen backbone"] / floor
    verdicts.check("frozen-backbone step <= 1.2x the eval forward", ratio <= 1.2, f"{ratio:.3f}x")
    saved_flops = gflops["full step"] - gflops["first half frozen"]
    needed_flops = gflops["first-half forward"]
    saved_ms = full - ms["first half frozen"]
    needed_ms = ms["first-half forward"]
    verdicts.check(
        "first-half-frozen step saves the frozen half's weight-gradient work",
        saved_flops >= needed_flops and saved_ms >= needed_ms,
        f"saves {saved_flops:.3f} GFLOP ({saved_flops / needed_flops:.2f}x the half's weight-"
        f"gradient FLOPs) and {saved_ms:.2f} ms ({saved_ms / needed_ms:.2f}x its forward time)",
    )
    for name, trainer in trainers.items():
        state, count, params = trainer.state_bytes()
        verdicts.check(
            f"{name}: Adam state bytes exactly 2x trainable bytes",
            state == 2 * params,
            f"{state:,} bytes of moments for {params:,} trainable bytes "
            f"(and {count} bytes of step count)",
        )
    return verdicts


if __name__ == "__main__":
    main()
