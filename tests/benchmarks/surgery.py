"""Tree-surgery cost: `nn.eval_mode` and `treenn.freeze` on 1,000 and 5,000 small blocks.

Each block is a Linear(4, 4) + LayerNorm(4) + Dropout: 4 arrays, 4 modules, built from
Equinox's layers and from treenn's (`eqx.nn.inference_mode` runs on both: `inference` is
a bool leaf on treenn's layers too). Baselines measured in the same process, interleaved
with the candidates in rotating rounds: `eqx.nn.inference_mode`, and a bare
`jax.tree_util.tree_flatten` (the floor for anything that visits every node). Selectors
timed: `None`, a class (`Dropout`, `Linear`), a glob and a getter.

Run: `python tests/benchmarks/surgery.py [--repeats 9] [--tiny]`. Targets: linear growth,
<= 0.1x eqx.nn.inference_mode, <= 3x tree_flatten; a class selector <= 2x tree_flatten
(what `where=None` costs).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
from _harness import Verdicts, header, interleaved, median

import treenn
import treenn.nn as nn

# Growth from the small size to the large one may exceed linear growth by this much (timer
# noise on a shared machine).
LINEAR_SLACK = 1.25


class Block(treenn.Module):
    linear: nn.Linear | eqx.nn.Linear
    norm: nn.LayerNorm | eqx.nn.LayerNorm
    dropout: nn.Dropout | eqx.nn.Dropout

    def __init__(self, *, key: jax.Array, layers: str):
        if layers == "eqx":
            self.linear = eqx.nn.Linear(4, 4, key=key)
            self.norm = eqx.nn.LayerNorm(4)
            self.dropout = eqx.nn.Dropout(0.1)
        else:
            self.linear = nn.Linear(4, 4, key=key)
            self.norm = nn.LayerNorm(4)
            self.dropout = nn.Dropout(0.1)


class Stack(treenn.Module):
    blocks: tuple[Block, ...]


def make(n: int, layers: str) -> Stack:
    key = jax.random.key(0)
    block = Block(key=key, layers=layers)
    # Distinct arrays per block (as in a real model), built quickly.
    return Stack(tuple(jtu.tree_map(lambda a: a + i, block) for i in range(n)))


def check_results(model: Stack, layers: str) -> None:
    """The timed calls do their job (a benchmark of a no-op would be meaningless)."""
    assert all(nn.modes(nn.eval_mode(model)).values())
    assert not jtu.tree_leaves(treenn.trainable(treenn.freeze(model)))
    switched = eqx.nn.inference_mode(model)
    assert all(b.dropout.inference for b in switched.blocks)
    drop = eqx.nn.Dropout if layers == "eqx" else nn.Dropout
    assert all(nn.modes(nn.eval_mode(model, drop)).values())


def measure(n: int, layers: str, repeats: int) -> dict[str, float]:
    """Median milliseconds of each operation on an `n`-block model."""
    model = make(n, layers)
    check_results(model, layers)
    drop = eqx.nn.Dropout if layers == "eqx" else nn.Dropout
    linear = eqx.nn.Linear if layers == "eqx" else nn.Linear
    fns: dict[str, Callable[[], Any]] = {
        "flatten": lambda: jtu.tree_flatten(model),
        "eval_mode": lambda: nn.eval_mode(model),
        "freeze": lambda: treenn.freeze(model),
        "eval_mode class": lambda: nn.eval_mode(model, drop),
        "freeze class": lambda: treenn.freeze(model, linear),
        "eval_mode path": lambda: nn.eval_mode(model, "blocks.*.dropout"),
        "freeze path": lambda: treenn.freeze(model, "**.bias"),
        "eval_mode getter": lambda: nn.eval_mode(model, lambda m: [b.dropout for b in m.blocks]),
        "eqx.inference_mode": lambda: eqx.nn.inference_mode(model),
    }
    times = interleaved(fns, repeats)
    return {name: median(ts) * 1e3 for name, ts in times.items()}


def main(argv: list[str] | None = None) -> Verdicts:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 5000])
    parser.add_argument("--tiny", action="store_true", help="a quick smoke run, no timing value")
    args = parser.parse_args(argv)
    sizes, repeats = ([50, 250], 3) if args.tiny else (args.sizes, args.repeats)
    header(f"Tree surgery on {sizes[0]} and {sizes[1]} blocks (median of {repeats}, interleaved)")
    results = {
        (n, layers): measure(n, layers, repeats) for n in sizes for layers in ("eqx", "treenn")
    }
    eqx_ms = {n: results[n, "eqx"]["eqx.inference_mode"] for n in sizes}
    for (n, layers), r in results.items():
        print(
            f"{n:7d} {layers:>7}: eqx.inference_mode {r['eqx.inference_mode']:.1f} ms; "
            + ", ".join(
                f"{op} {r[op]:.2f} ms ({r[op] / r['flatten']:.2f}x flatten)"
                for op in (
                    "eval_mode",
                    "eval_mode class",
                    "eval_mode path",
                    "eval_mode getter",
                    "freeze",
                    "freeze class",
                    "freeze path",
                )
            )
        )
    print(
        f"{'blocks':>7} {'layers':>7} {'flatten':>8} {'eqx.inference_mode':>19} "
        f"{'nn.eval_mode':>13} {'treenn.freeze':>14}  ratios vs eqx / vs flatten"
    )
    for (n, layers), r in results.items():
        print(
            f"{n:7d} {layers:>7} {r['flatten']:8.2f} {eqx_ms[n]:19.1f} {r['eval_mode']:13.2f} "
            f"{r['freeze']:14.2f}  eval_mode {r['eval_mode'] / eqx_ms[n]:.3f} / "
            f"{r['eval_mode'] / r['flatten']:.2f}, freeze {r['freeze'] / eqx_ms[n]:.3f} / "
            f"{r['freeze'] / r['flatten']:.2f}"
        )
        print(
            f"{'':16}with a path selector: eval_mode 'blocks.*.dropout' "
            f"{r['eval_mode path']:.2f} ms ({r['eval_mode path'] / r['flatten']:.2f}x flatten), "
            f"freeze '**.bias' {r['freeze path']:.2f} ms "
            f"({r['freeze path'] / r['flatten']:.2f}x flatten)"
        )
    verdicts = Verdicts(smoke=args.tiny)
    small, large = sizes
    for n in sizes:
        for layers in ("eqx", "treenn"):
            r = results[n, layers]
            for op in ("eval_mode class", "freeze class"):
                verdicts.check(
                    f"{op} selector, {n} blocks of {layers} layers: <= 2x tree_flatten",
                    r[op] / r["flatten"] <= 2,
                    f"{r[op] / r['flatten']:.2f}x",
                )
    for op in ("eval_mode", "freeze"):
        for n in sizes:
            ratio = results[n, "eqx"][op] / eqx_ms[n]
            verdicts.check(
                f"{op}, {n} blocks: <= 0.1x eqx.nn.inference_mode", ratio <= 0.1, f"{ratio:.3f}x"
            )
            for layers in ("eqx", "treenn"):
                r = results[n, layers]
                verdicts.check(
                    f"{op}, {n} blocks of {layers} layers: <= 3x tree_flatten",
                    r[op] / r["flatten"] <= 3,
                    f"{r[op] / r['flatten']:.2f}x",
                )
        for layers in ("eqx", "treenn"):
            growth = results[large, layers][op] / results[small, layers][op]
            flat = results[large, layers]["flatten"] / results[small, layers]["flatten"]
            # Linear: as `tree_flatten` (a linear C++ visit) grows on this machine, or the
            # size ratio if that is larger, with some slack for noise.
            limit = LINEAR_SLACK * max(large / small, flat)
            verdicts.check(
                f"{op} on {layers} layers grows linearly ({small} -> {large} blocks)",
                growth <= limit,
                f"{growth:.2f}x (limit {limit:.2f}x; tree_flatten {flat:.2f}x, "
                f"eqx.inference_mode {eqx_ms[large] / eqx_ms[small]:.2f}x)",
            )
    return verdicts


if __name__ == "__main__":
    main()
