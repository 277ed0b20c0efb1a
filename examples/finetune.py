"""Functional fine-tuning with treenn, end to end on real data (no download).

scikit-learn's handwritten digits (1,797 real 8x8 images): pretrain a small conv net on
digits 0-4, save a checkpoint, then fine-tune on digits 5-9 from it, three ways:

- linear probe: backbone frozen, its BatchNorm pinned in evaluation mode, new head;
- BitFit: only biases and the head train;
- full fine-tuning.

The probe is also run on a randomly initialised backbone, to show what pretraining buys.
Prints a table of test accuracy, trainable parameters and time.

    python examples/finetune.py [--steps 300] [--seed 0] [--out runs/finetune] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import treenn
import treenn.nn as nn


class ConvNet(treenn.Module):
    """conv-bn-relu x2, global average pooling, dropout, linear head."""

    conv1: nn.Conv2d
    bn1: nn.BatchNorm
    conv2: nn.Conv2d
    bn2: nn.BatchNorm
    dropout: nn.Dropout
    head: nn.Linear

    def __init__(self, num_classes: int, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, key=k1)
        self.bn1 = nn.BatchNorm(32)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1, key=k2)
        self.bn2 = nn.BatchNorm(64)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(64, num_classes, key=k3)

    def __call__(
        self, x: Float[Array, "batch 8 8 1"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "batch classes"]:
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        x = self.dropout(jnp.mean(x, axis=(1, 2)), key=key)
        return self.head(x)


Data = tuple[np.ndarray, np.ndarray]


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


def loss_fn(
    model: ConvNet, x: Float[Array, "batch 8 8 1"], y: Int[Array, " batch"], key: PRNGKeyArray
) -> tuple[Array, ConvNet]:
    logits, model = treenn.apply(model, x, key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), model


def train(
    model: ConvNet, data: Data, *, steps: int, lr: float, seed: int, desc: str
) -> tuple[ConvNet, list[float]]:
    tx = optax.adam(lr)
    opt_state = tx.init(treenn.trainable(model))

    @treenn.jit
    def step(model: ConvNet, opt_state: Any, x: Array, y: Array, key: PRNGKeyArray) -> Any:
        (loss, model), grads = treenn.value_and_grad(loss_fn, has_aux=True)(model, x, y, key)
        updates, opt_state = tx.update(grads, opt_state, treenn.trainable(model))
        return treenn.apply_updates(model, updates), opt_state, loss

    model = nn.train_mode(model)  # pinned modules (a frozen backbone's BN) stay in eval
    x, y = data
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    losses = []
    for i in tqdm(range(steps), desc=desc, leave=False):
        batch = rng.choice(len(x), size=64, replace=False)
        model, opt_state, loss = step(
            model, opt_state, x[batch], y[batch], jax.random.fold_in(key, i)
        )
        losses.append(loss)
    return model, [float(v) for v in losses]


def accuracy(model: ConvNet, data: Data) -> float:
    predict = treenn.jit(lambda m, x: jnp.argmax(m(x), axis=-1))
    x, y = data
    return float(np.mean(np.asarray(predict(nn.eval_mode(model), x)) == y))


def with_new_head(model: ConvNet, num_classes: int, key: PRNGKeyArray) -> ConvNet:
    return eqx.tree_at(lambda m: m.head, model, nn.Linear(64, num_classes, key=key))


def count(model: ConvNet) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(treenn.trainable(model)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/finetune", help="output folder")
    parser.add_argument("--quick", action="store_true", help="a few steps, for CI")
    args = parser.parse_args()
    steps = 30 if args.quick else args.steps
    os.makedirs(args.out, exist_ok=True)
    key = jax.random.key(args.seed)
    k_model, k_head, k_random = jax.random.split(key, 3)

    old_train, old_test = digits(range(0, 5), args.seed)
    new_train, new_test = digits(range(5, 10), args.seed)

    start = time.perf_counter()
    pretrained, _ = train(
        ConvNet(5, key=k_model),
        old_train,
        steps=steps,
        lr=3e-3,
        seed=args.seed,
        desc="pretrain 0-4",
    )
    print(
        f"pretrained on digits 0-4: test accuracy {accuracy(pretrained, old_test):.3f} "
        f"({time.perf_counter() - start:.1f}s)"
    )
    checkpoint = os.path.join(args.out, "pretrained.safetensors")
    treenn.save(checkpoint, pretrained)

    def from_checkpoint() -> ConvNet:
        like = ConvNet(5, key=k_random)
        return with_new_head(treenn.load(checkpoint, like), 5, k_head)

    recipes: dict[str, Callable[[], ConvNet]] = {
        "linear probe (random backbone)": lambda: frozen_backbone(
            with_new_head(ConvNet(5, key=k_random), 5, k_head)
        ),
        "linear probe": lambda: frozen_backbone(from_checkpoint()),
        "BitFit": lambda: treenn.unfreeze(
            treenn.unfreeze(treenn.freeze(from_checkpoint()), "**.bias"), "head"
        ),
        "full fine-tuning": from_checkpoint,
    }
    print(f"\nfine-tuning on digits 5-9, {steps} steps each")
    print(f"{'recipe':32} {'test acc':>8} {'trainable':>10} {'time':>7}")
    for name, make in recipes.items():
        start = time.perf_counter()
        model, _ = train(make(), new_train, steps=steps, lr=3e-3, seed=args.seed, desc=name)
        print(
            f"{name:32} {accuracy(model, new_test):8.3f} {count(model):10,d} "
            f"{time.perf_counter() - start:6.1f}s"
        )


def frozen_backbone(model: ConvNet) -> ConvNet:
    """Everything but the head frozen, the backbone's BatchNorm pinned in eval mode."""
    model = treenn.freeze(model, lambda m: (m.conv1, m.bn1, m.conv2, m.bn2))
    return nn.eval_mode(model, nn.BatchNorm, pin=True)


if __name__ == "__main__":
    main()
