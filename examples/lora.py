"""Parameter-efficient fine-tuning by tree surgery: LoRA, layer-wise learning-rate decay,
adapter-only checkpoints and merging, on real data (no download).

scikit-learn's handwritten digits (1,797 real 8x8 images, shipped with the package):

1. pretrain a small ViT (`treenn.models.VisionTransformer`, timm's names) on digits 0-4;
2. fine-tune it on digits 5-9 with a new head, four ways, from the same weights:
   - LoRA: `treenn.lora(treenn.freeze(model), "blocks.**", rank=4)` (every Linear of the
     blocks: `qkv`, `proj`, `fc1`, `fc2`) and the new head;
   - LoRA with layer-wise learning-rate decay (`treenn.layer_decay`, timm's formula)
     through `optax.multi_transform`;
   - full fine-tuning;
   - a linear probe (`treenn.freeze_backbone(model, "head")`);
3. report test accuracy, trainable parameters, the trainable-only checkpoint
   (`treenn.save(path, treenn.trainable(model))`), time per training step, the
   compiled step's memory (XLA's memory analysis: arguments + temporaries), and show that
   `treenn.merge_lora` gives the adapted model's predictions at the base model's speed.

    python examples/lora.py [--pretrain-steps 300] [--steps 200] [--seed 0] [--quick]
                            [--out runs/lora]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import treenn
import treenn.nn as nn
from treenn.models import VisionTransformer

Data = tuple[np.ndarray, np.ndarray]
BATCH = 64
FILES = {
    "LoRA (r=4)": "lora",
    "LoRA + layer decay 0.75": "lora-decay",
    "full fine-tuning": "full-ft",
    "linear probe": "probe",
}


def digits(classes: range, seed: int) -> tuple[Data, Data]:
    """Train/test split of the digits in `classes`, labels shifted to start at 0."""
    images, labels = load_digits(return_X_y=True)
    keep = np.isin(labels, list(classes))
    x = (images[keep] / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y = (labels[keep] - classes.start).astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


def xent(model: Any, x: Float[Array, "b 8 8 1"], y: Int[Array, " b"], key: PRNGKeyArray) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x, key=key), y).mean()


def train(model: Any, tx: Any, data: Data, steps: int, seed: int) -> tuple[Any, float]:
    """`steps` optimiser steps; returns the model and the mean time per step (after the
    first, which compiles)."""
    opt_state = tx.init(treenn.trainable(model))
    step = treenn.train_step(xent, tx)
    x, y = data
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    start = None
    for i in range(steps):
        batch = rng.choice(len(x), size=BATCH, replace=False)
        model, opt_state, loss = step(
            model, opt_state, x[batch], y[batch], jax.random.fold_in(key, i)
        )
        if i == 0:
            jax.block_until_ready(loss)
            start = time.perf_counter()
    jax.block_until_ready(loss)
    per_step = (time.perf_counter() - start) / max(steps - 1, 1) if start else float("nan")
    return model, per_step


def step_memory(model: Any, tx: Any, x: np.ndarray, y: np.ndarray) -> int:
    """Bytes XLA plans for one compiled training step: arguments plus temporaries."""

    def step(model: Any, opt_state: Any, x: Array, y: Array) -> Any:
        grads = treenn.grad(lambda m: xent(m, x, y, jax.random.key(0)))(model)
        params = treenn.trainable(model)
        updates, opt_state = tx.update(grads, opt_state, params)
        return treenn.apply_updates(model, updates), opt_state

    opt_state = tx.init(treenn.trainable(model))
    # Equinox annotates filter_jit as returning a plain Callable; its wrapper has .lower.
    lowered = eqx.filter_jit(step).lower(model, opt_state, x, y)  # type: ignore[attr-defined]
    compiled = lowered.compile()
    stats = getattr(compiled, "compiled", compiled).memory_analysis()  # Equinox's wrapper
    return int(stats.argument_size_in_bytes + stats.temp_size_in_bytes)


predict = treenn.eval_step(lambda model, x: model(x))


def accuracy(model: Any, data: Data) -> float:
    x, y = data
    return float(np.mean(np.argmax(np.asarray(predict(model, x)), axis=-1) == y))


def count(model: Any) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(treenn.trainable(model)))


def forward_time(model: Any, x: np.ndarray, repeats: int) -> float:
    """Seconds per jitted evaluation-mode forward pass over `x`."""
    model = nn.eval_mode(model)
    fwd = treenn.jit(lambda m, x: m(x))
    jax.block_until_ready(fwd(model, x))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fwd(model, x)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/lora")
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.steps = 20, 10
    os.makedirs(args.out, exist_ok=True)
    key = jax.random.key(args.seed)
    k_model, k_head, k_lora = jax.random.split(key, 3)

    # 1. Pretraining on digits 0-4.
    pre_train, pre_test = digits(range(0, 5), args.seed)
    vit = VisionTransformer(
        5, img_size=8, patch_size=2, in_channels=1, dim=64, depth=4, num_heads=4, key=k_model
    )
    vit, _ = train(vit, optax.adam(1e-3), pre_train, args.pretrain_steps, args.seed)
    print(f"pretrained on 0-4: test accuracy {accuracy(vit, pre_test):.3f}")

    # 2. Fine-tuning on digits 5-9: a new head, four ways.
    data, test = digits(range(5, 10), args.seed)
    base = eqx.tree_at(lambda m: m.head, vit, nn.Linear(64, 5, key=k_head))
    adapted = treenn.unfreeze(
        treenn.lora(treenn.freeze(base), "blocks.**", rank=4, alpha=8, key=k_lora), "head"
    )
    groups = treenn.layer_decay(adapted, 0.75)
    ways = {
        "LoRA (r=4)": (adapted, optax.adam(3e-3)),
        "LoRA + layer decay 0.75": (
            adapted,
            optax.multi_transform(groups.transforms(lambda s: optax.adam(3e-3 * s)), groups),
        ),
        "full fine-tuning": (base, optax.adam(1e-3)),
        "linear probe": (treenn.freeze_backbone(base, "head"), optax.adam(3e-3)),
    }
    full_size = _saved_size(os.path.join(args.out, "full.eqx"), base)
    rows = []
    results = {}
    for name, (model, tx) in ways.items():
        memory = step_memory(model, tx, data[0][:BATCH], data[1][:BATCH])
        model, per_step = train(model, tx, data, args.steps, args.seed)
        results[name] = model
        path = os.path.join(args.out, f"{FILES[name]}-trainable.eqx")
        size = _saved_size(path, treenn.trainable(model))
        rows.append((name, accuracy(model, test), count(model), size, per_step, memory))

    print(
        f"\nfine-tuned on 5-9 ({args.steps} steps, batch {BATCH}); full checkpoint "
        f"{full_size / 1024:.0f} KiB"
    )
    print(f"{'':26}{'test acc':>9}{'trainable':>11}{'ckpt KiB':>10}{'ms/step':>9}{'step MiB':>10}")
    for name, acc, n, size, per_step, memory in rows:
        print(
            f"{name:26}{acc:9.3f}{n:11,}{size / 1024:10.1f}{per_step * 1e3:9.1f}"
            f"{memory / 2**20:10.2f}"
        )

    # 3. Adapter-only checkpoint back onto a base loaded from elsewhere, and merging.
    lora_model = results["LoRA (r=4)"]
    path = os.path.join(args.out, "lora-trainable.eqx")
    fresh = treenn.unfreeze(
        treenn.lora(treenn.freeze(base), "blocks.**", rank=4, alpha=8, key=k_lora), "head"
    )
    restored = treenn.load_trainable(path, fresh)
    same = np.array_equal(predict(restored, test[0]), predict(lora_model, test[0]))
    print(f"\nadapters reloaded onto the base: identical predictions: {same}")
    merged = treenn.merge_lora(lora_model)
    got, want = np.asarray(predict(merged, test[0])), np.asarray(predict(lora_model, test[0]))
    agree = np.mean(got.argmax(-1) == want.argmax(-1))
    print(
        f"merged: max |logit difference| {np.abs(got - want).max():.2e}, "
        f"same class for {agree:.1%} of the test set"
    )
    repeats = 5 if args.quick else 50
    times = {
        "base model": forward_time(base, test[0], repeats),
        "adapted (LoRA)": forward_time(lora_model, test[0], repeats),
        "merged": forward_time(merged, test[0], repeats),
    }
    for name, seconds in times.items():
        print(f"forward over the test set, {name:15}: {seconds * 1e3:7.2f} ms")


def _saved_size(path: str, tree: Any) -> int:
    treenn.save(path, tree)
    return os.path.getsize(path)


if __name__ == "__main__":
    main()
