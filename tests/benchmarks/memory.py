"""Memory of a training loop: treenn.jit against eqx.filter_jit on the same loop.

The step of `dispatch.py` (an MLP, Adam, the first layer frozen) at a size where memory
shows (8 layers of 512x512: 8.4 MB of parameters). For each variant, in one process,
one after the other:

- live bytes between steps: the bytes of every live JAX array (`jax.live_arrays()`),
  above what was live before the model was built, after each step once the previous
  model and optimiser state were dropped: what a step leaves behind besides what the
  user holds;
- live bytes after `del model, opt_state`: what the compiled function itself keeps;
- the step's own peak: XLA's `compiled.memory_analysis()` (arguments + outputs +
  temporaries - aliased), and on a GPU the device's `bytes_in_use` between steps.

Run: `python tests/benchmarks/memory.py [--steps 20] [--tiny]`.
Target: treenn's numbers equal to (or below) eqx.filter_jit's.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import optax
from _harness import Verdicts, header
from dispatch import MLP, mse

import treenn

Step = Callable[..., Any]


def live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def treenn_step(tx: Any) -> Step:
    @treenn.jit
    def step(model, opt, x, y):
        loss, grads = treenn.value_and_grad(mse)(model, x, y)
        updates, opt = tx.update(grads, opt, treenn.trainable(model))
        return treenn.apply_updates(model, updates), opt, loss

    return step


def treenn_state(model: MLP, tx: Any) -> tuple[Any, Any]:
    model = treenn.freeze(model, "layers.0")
    return model, tx.init(treenn.trainable(model))


def eqx_step(tx: Any) -> Step:
    frozen = lambda m: m.layers[0]

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

    return step


def eqx_state(model: MLP, tx: Any) -> tuple[Any, Any]:
    params = eqx.filter(model, eqx.is_inexact_array)
    return model, tx.init(eqx.tree_at(lambda m: m.layers[0], params, replace_fn=lambda _: None))


def peak_bytes(lowered: Any) -> int:
    """Arguments + outputs + temporaries - aliased (donated) bytes of one step, per XLA."""
    m = lowered.compile().memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def measure(kind: str, width: int, depth: int, steps: int) -> dict[str, float]:
    key = jax.random.key(0)
    tx = optax.adam(1e-3)
    x = jax.random.normal(jax.random.fold_in(key, 1), (32, width))
    y = jax.random.normal(jax.random.fold_in(key, 2), (32, width))
    base = live_bytes()
    make_state, make_step = (
        (treenn_state, treenn_step) if kind == "treenn" else (eqx_state, eqx_step)
    )
    model, opt = make_state(MLP(width, depth, key=key), tx)
    step = make_step(tx)
    held = live_bytes() - base  # the model and the optimiser state: what the user holds
    if kind == "treenn":
        peak = peak_bytes(step.lower(model, opt, x, y))
    else:
        peak = peak_bytes(step.lower(model, opt, x, y).lowered)
    between, on_device = [], []
    for _ in range(steps):
        model, opt, loss = step(model, opt, x, y)
        loss.block_until_ready()
        del loss
        between.append(live_bytes() - base)
        device = device_bytes()
        if device is not None:
            on_device.append(device)
    del model, opt
    after = live_bytes() - base
    result = {
        "held": held,
        "between": statistics.median(between),
        "after del": after,
        "peak (XLA)": peak,
    }
    if on_device:
        result["device in use"] = statistics.median(on_device)
    return result


def report(results: dict[str, dict[str, float]], verdicts: Verdicts) -> None:
    names = list(next(iter(results.values())))
    print(f"{'variant':16}" + "".join(f"{name + ' MB':>18}" for name in names))
    for kind, numbers in results.items():
        print(f"{kind:16}" + "".join(f"{numbers[n] / 2**20:18.3f}" for n in names))
    mine, theirs = results["treenn.jit"], results["eqx.filter_jit"]
    slack = 0.01 * theirs["held"]  # 1% of the state: allocator rounding, a loss scalar
    for name in names:
        if name == "held":
            continue
        verdicts.check(
            f"memory: treenn.jit {name} <= eqx.filter_jit's",
            mine[name] <= theirs[name] + slack,
            f"{mine[name] / 2**20:.3f} MB vs {theirs[name] / 2**20:.3f} MB",
        )


def main(argv: list[str] | None = None) -> Verdicts:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a quick smoke run")
    args = parser.parse_args(argv)
    width, depth, steps = (16, 3, 3) if args.tiny else (512, 8, args.steps)
    header(f"memory of a training loop: MLP {depth}x{width}, Adam, layer 0 frozen, {steps} steps")
    results = {
        "treenn.jit": measure("treenn", width, depth, steps),
        "eqx.filter_jit": measure("eqx", width, depth, steps),
    }
    verdicts = Verdicts(smoke=args.tiny)
    report(results, verdicts)
    return verdicts


if __name__ == "__main__":
    main()
