"""Tree-surgery cost: `nn.eval_mode` and `treenn.freeze` on 1,000 and 5,000 small blocks.

Each block is a Linear(4, 4) + LayerNorm(4) + Dropout: 4 arrays, 4 modules, built from
Equinox's layers so that `eqx.nn.inference_mode` runs on the very same model (it cannot
switch treenn's layers, whose `inference` is a static field). Baselines measured in the
same process: `eqx.nn.inference_mode`, and a bare `jax.tree_util.tree_flatten` (the
floor for anything that visits every node). The same model built from treenn's layers
is timed too.

Run: `python tests/benchmarks/surgery.py [--repeats 7]`. Targets: linear growth,
<= 0.1x eqx.nn.inference_mode, <= 3x tree_flatten.
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.tree_util as jtu

import treenn
import treenn.nn as nn


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


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    args = parser.parse_args()
    print(f"jax {jax.__version__}, equinox {eqx.__version__}; median of {args.repeats}, ms")
    header = (
        f"{'blocks':>7} {'model':>14} {'flatten':>8} {'eqx.inference_mode':>19} "
        f"{'nn.eval_mode':>13} {'treenn.freeze':>14}   ratios vs eqx / vs flatten"
    )
    print(header)
    for n in args.sizes:
        model = make(n, "eqx")
        flat = timed(lambda: jtu.tree_flatten(model), args.repeats)
        eqx_t = timed(lambda: eqx.nn.inference_mode(model), max(3, args.repeats // 2))
        for layers in ("eqx", "treenn"):
            model = make(n, layers)
            flat = timed(lambda: jtu.tree_flatten(model), args.repeats)
            ev = timed(lambda: nn.eval_mode(model), args.repeats)
            fr = timed(lambda: treenn.freeze(model), args.repeats)
            print(
                f"{n:7d} {layers + ' layers':>14} {flat * 1e3:8.2f} {eqx_t * 1e3:19.1f} "
                f"{ev * 1e3:13.2f} {fr * 1e3:14.2f}   eval_mode {ev / eqx_t:.3f} / "
                f"{ev / flat:.2f}   freeze {fr / eqx_t:.3f} / {fr / flat:.2f}"
            )
        sel = timed(lambda: nn.eval_mode(model, "blocks.*.dropout"), args.repeats)
        frs = timed(lambda: treenn.freeze(model, "**.weight"), args.repeats)
        print(
            f"{'':22} with a path selector: eval_mode 'blocks.*.dropout' {sel * 1e3:.2f} ms "
            f"({sel / flat:.2f}x flatten), freeze '**.weight' {frs * 1e3:.2f} ms "
            f"({frs / flat:.2f}x flatten)"
        )


if __name__ == "__main__":
    main()
