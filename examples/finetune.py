"""Functional fine-tuning with treenn, end to end on real data (no download).

scikit-learn's handwritten digits (1,797 real 8x8 images, shipped with the package):

1. pretrain a small-input ResNet-18 (`treenn.models`) on digits 0-4 (cross-entropy plus
   SimCLR's contrastive loss on two augmented views of each image) and save a checkpoint;
2. fine-tune it on digits 5-9 with a new head (dropout + linear), four ways, all from the
   same checkpoint: linear probe (frozen backbone, its BatchNorm pinned in eval), BitFit
   (biases and head), gradual unfreezing (deepest stage first, optimiser moments carried
   across stages) and full fine-tuning; the probe also runs on a random backbone;
3. MC dropout on the fine-tuned model (BatchNorm in eval, dropout on): predictive entropy
   of correct vs wrong predictions.

Prints a table (test accuracy, trainable parameters, time) and writes a PNG with the
learning curves and the uncertainty histogram.

    python examples/finetune.py [--steps 300] [--seed 0] [--out runs/finetune] [--quick]

Outputs go to the `--out` folder (default `runs/finetune/`, created if missing):
`pretrained.safetensors` (the pretraining checkpoint) and `finetune.png` (the figure).
Progress bars show only when stderr is a terminal, so logs stay short.

With `--weights PATH` it starts from a PyTorch ResNet-18 state dict (`.pt`, `.pth` or
`.safetensors`, loaded by `treenn.load_torch`) instead of pretraining; `--width`,
`--stem` and `--in-channels` describe its architecture (a torchvision ResNet-18:
`--width 64 --stem imagenet --in-channels 3`; grey digits are then repeated to 3
channels).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import treenn
import treenn.nn as nn
from treenn.models import ResNet, resnet18

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Data = tuple[np.ndarray, np.ndarray]
WIDTH = 16  # ResNet-18 with 16-64-128-... channels: small images, small model
BATCH = 64


def digits(classes: range, seed: int, channels: int = 1) -> tuple[Data, Data]:
    """Train/test split of the digits in `classes`, labels shifted to start at 0."""
    images, labels = load_digits(return_X_y=True)
    keep = np.isin(labels, list(classes))
    x = (images[keep] / 16.0).astype(np.float32).reshape(-1, 8, 8, 1).repeat(channels, -1)
    y = (labels[keep] - classes.start).astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


def xent(
    model: ResNet, x: Float[Array, "b 8 8 c"], y: Int[Array, " b"], key: PRNGKeyArray
) -> Array:
    # treenn.train_step runs the model in training mode and collects BatchNorm
    # statistics itself: the loss just calls the model.
    return optax.softmax_cross_entropy_with_integer_labels(model(x, key=key), y).mean()


def train(
    model: Any,
    data: Data,
    steps: int,
    desc: str,
    seed: int,
    tx: Any = None,
    opt_state: Any = None,
    loss_fn: Callable[..., Array] = xent,
) -> tuple[Any, Any, list[float]]:
    """`steps` Adam steps; returns the model, the optimiser state and the losses."""
    tx = tx or optax.adam(3e-3)
    opt_state = tx.init(treenn.trainable(model)) if opt_state is None else opt_state
    step = treenn.train_step(loss_fn, tx)
    x, y = data
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    losses = []
    # No bars in logs (a redirected run): tqdm redraws a line per update.
    for i in tqdm(range(steps), desc=desc, leave=False, disable=not sys.stderr.isatty()):
        batch = rng.choice(len(x), size=BATCH, replace=False)
        model, opt_state, loss = step(
            model, opt_state, x[batch], y[batch], jax.random.fold_in(key, i)
        )
        losses.append(loss)
    return model, opt_state, [float(v) for v in losses]


predict = treenn.eval_step(lambda model, x: jnp.argmax(model(x), axis=-1))


def accuracy(model: ResNet, data: Data) -> float:
    x, y = data
    return float(np.mean(np.asarray(predict(model, x)) == y))


def new_head(model: ResNet, key: PRNGKeyArray) -> ResNet:
    """Replace the 0-4 head by a fresh one for 5-9, with dropout for MC dropout."""
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(model.fc.in_features, 5, key=key))
    return eqx.tree_at(lambda m: m.fc, model, head)


def count(model: ResNet) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(treenn.trainable(model)))


def gradual(model: ResNet, data: Data, steps: int, seed: int) -> tuple[ResNet, Any, list[float]]:
    """Head first, then one stage more per phase, deepest first; the optimiser moments
    of arrays that stay trainable are carried across phases."""
    phases: list[tuple[str, Callable[[ResNet], Any]]] = [
        ("head", lambda m: m.fc),
        ("layer4", lambda m: m.layer4),
        ("layer3", lambda m: m.layer3),
        ("layer2", lambda m: m.layer2),
        ("layer1 + stem", lambda m: (m.layer1, m.conv1, m.bn1)),
    ]
    tx = optax.adam(3e-3)
    model = treenn.freeze_backbone(model, "fc")
    opt_state, losses = None, []
    for i, (name, stage) in enumerate(phases):
        if i > 0:  # the stage trains, and its BatchNorm leaves the pinned eval mode
            model = nn.train_mode(treenn.unfreeze(model, stage, unpin=True), stage)
            opt_state = treenn.migrate_opt_state(tx, opt_state, model)
        model, opt_state, phase_losses = train(
            model, data, steps // len(phases), f"gradual: {name}", seed + i, tx, opt_state
        )
        losses += phase_losses
    return model, opt_state, losses


def backbone_unchanged(model: ResNet, reference: ResNet) -> bool:
    """Bit-identical backbone arrays (parameters and BatchNorm statistics); modes, which
    are bool leaves and differ (the probe's BatchNorm is pinned in eval), are not compared."""

    def backbone(m: ResNet) -> list[jax.Array]:
        leaves = jax.tree_util.tree_leaves(eqx.tree_at(lambda m: m.fc, m, None))
        return [x for x in leaves if isinstance(x, jax.Array)]

    return all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(backbone(model), backbone(reference), strict=True)
    )


def mc_dropout_entropy(
    model: ResNet, data: Data, samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Predictive entropy and correctness under MC dropout: BatchNorm in eval, the
    head's dropout pinned in training mode."""
    mc = nn.train_mode(nn.eval_mode(model), nn.Dropout, pin=True)
    probs = treenn.eval_step(lambda m, x, k: jax.nn.softmax(m(x, key=k), axis=-1))
    x, y = data
    mean = np.mean(
        [np.asarray(probs(mc, x, jax.random.key(seed + s))) for s in range(samples)], axis=0
    )
    entropy = -np.sum(mean * np.log(mean + 1e-12), axis=-1)
    return entropy, mean.argmax(-1) == y


def plot(
    curves: dict[str, list[float]], entropy: np.ndarray, correct: np.ndarray, path: str
) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, losses in curves.items():
        smooth = np.convolve(losses, np.ones(10) / 10, mode="valid") if len(losses) > 10 else losses
        ax1.plot(smooth, label=name)
    ax1.set(title="fine-tuning on digits 5-9", xlabel="step", ylabel="training loss", yscale="log")
    ax1.legend()
    bins = np.linspace(0, max(float(entropy.max()), 1e-3), 25)
    ax2.hist(
        entropy[correct], bins=bins, alpha=0.7, label=f"correct ({correct.sum()})", density=True
    )
    ax2.hist(
        entropy[~correct], bins=bins, alpha=0.7, label=f"wrong ({(~correct).sum()})", density=True
    )
    ax2.set(title="MC dropout: predictive entropy", xlabel="entropy (nats)", ylabel="density")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per fine-tuning run")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--mc-samples", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/finetune", help="output folder")
    parser.add_argument("--quick", action="store_true", help="a few steps of each, for CI")
    parser.add_argument(
        "--weights", help="start from this PyTorch ResNet-18 state dict instead of pretraining"
    )
    parser.add_argument("--width", type=int, default=WIDTH, help="channels of the first stage")
    parser.add_argument("--stem", choices=("small", "imagenet"), default="small")
    parser.add_argument("--in-channels", type=int, choices=(1, 3), default=1)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.pretrain_steps, args.mc_samples = 25, 40, 4
    os.makedirs(args.out, exist_ok=True)
    k_model, k_head, k_random = jax.random.split(jax.random.key(args.seed), 3)
    old_train, old_test = digits(range(0, 5), args.seed, args.in_channels)
    new_train, new_test = digits(range(5, 10), args.seed, args.in_channels)

    def build(key: PRNGKeyArray) -> ResNet:
        small = args.stem == "small"
        return resnet18(
            5, in_channels=args.in_channels, width=args.width, small_input=small, key=key
        )

    if args.weights:
        # The file's own head (1,000 ImageNet classes, say) is not used: strict=False
        # loads every array that fits and reports the rest.
        loaded, report = treenn.load_torch(
            args.weights, new_head(build(k_random), k_head), strict=False, report=True
        )
        print(
            f"loaded {len(report.loaded)} arrays from {args.weights}; new: {report.missing}; "
            f"not used: {report.unexpected}"
        )
    else:
        loaded = pretrain(args, build(k_model), old_train, old_test, k_head, build(k_random))
    random_backbone = new_head(build(k_random), k_head)
    run_recipes(args, loaded, random_backbone, new_train, new_test)


class Pretraining(treenn.Module):
    """A ResNet (without its head) with the two pretraining heads: the 0-4 classifier
    and SimCLR's projector for the contrastive loss (discarded after pretraining)."""

    resnet: ResNet
    cls: nn.Linear
    proj: nn.Sequential

    def __init__(self, resnet: ResNet, features: int, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.resnet = resnet
        self.cls = nn.Linear(features, 5, key=k1)
        self.proj = nn.Sequential(
            nn.Linear(features, features, key=k2), jax.nn.relu, nn.Linear(features, 64, key=k3)
        )

    def __call__(
        self, x: Float[Array, "b h w c"], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "b 5"], Float[Array, "b 64"]]:
        h = self.resnet(x)
        return self.cls(h), self.proj(h)


def augment(x: Float[Array, "b h w c"], key: PRNGKeyArray) -> Float[Array, "b h w c"]:
    """A random affine warp of each image: rotation up to 15 degrees, scale up to 10%,
    shear up to 0.15, shift up to 1 pixel (bilinear, zero fill)."""

    def one(image: Array, key: PRNGKeyArray) -> Array:
        k1, k2, k3, k4 = jax.random.split(key, 4)
        angle = jnp.deg2rad(jax.random.uniform(k1, (), minval=-15.0, maxval=15.0))
        scale = 1.0 + jax.random.uniform(k2, (2,), minval=-0.1, maxval=0.1)
        shear = jax.random.uniform(k3, (), minval=-0.15, maxval=0.15)
        shift = jax.random.uniform(k4, (2,), minval=-1.0, maxval=1.0)
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        warp = jnp.array([[cos, -sin], [sin, cos]]) @ jnp.array([[1.0, shear], [0.0, 1.0]])
        inverse = jnp.linalg.inv(warp @ jnp.diag(scale))
        h, w = image.shape[:2]
        centre = jnp.array([(h - 1) / 2, (w - 1) / 2])[:, None]
        grid = jnp.stack(jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")).reshape(2, -1)
        src = inverse @ (grid - centre - shift[:, None]) + centre
        channels = [
            jax.scipy.ndimage.map_coordinates(image[..., c], list(src), order=1, cval=0.0)
            for c in range(image.shape[-1])
        ]
        return jnp.stack(channels, -1).reshape(image.shape)

    return jax.vmap(one)(x, jax.random.split(key, x.shape[0]))


def pretrain_loss(
    model: Pretraining, x: Float[Array, "b 8 8 c"], y: Int[Array, " b"], key: PRNGKeyArray
) -> Array:
    """Cross-entropy on the 0-4 labels plus SimCLR's contrastive loss (NT-Xent,
    temperature 0.1) on two augmented views of each image: each view must pick out the
    other among the batch's 2b-1 views. Cross-entropy alone collapses each class's
    features towards a point; the contrastive term keeps what tells images apart within
    a class, which is what the new digits need."""
    k1, k2 = jax.random.split(key)
    n = x.shape[0]
    logits, z = model(jnp.concatenate([augment(x, k1), augment(x, k2)]))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.concatenate([y, y]))
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    similarity = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, z @ z.T / 0.1)
    views = jnp.arange(2 * n)
    nt_xent = -jax.nn.log_softmax(similarity, axis=-1)[views, (views + n) % (2 * n)]
    return ce.mean() + nt_xent.mean()


def pretrain(
    args: argparse.Namespace,
    model: ResNet,
    old_train: Data,
    old_test: Data,
    k_head: PRNGKeyArray,
    fresh: ResNet,
) -> ResNet:
    """Pretrain on digits 0-4, save a checkpoint, load its backbone under a new head."""
    start = time.perf_counter()
    features = model.fc.in_features
    pretraining = Pretraining(
        eqx.tree_at(lambda m: m.fc, model, nn.Identity()), features, jax.random.fold_in(k_head, 1)
    )
    pretraining, _, _ = train(
        pretraining,
        old_train,
        args.pretrain_steps,
        "pretrain 0-4",
        args.seed,
        loss_fn=pretrain_loss,
    )
    # The checkpoint is a plain ResNet: the 0-4 classifier as `fc`; the projector goes.
    pretrained = eqx.tree_at(lambda m: m.fc, pretraining.resnet, pretraining.cls)
    checkpoint = os.path.join(args.out, "pretrained.safetensors")
    treenn.save(checkpoint, pretrained)
    print(
        f"pretrained ResNet-18 on digits 0-4: test accuracy {accuracy(pretrained, old_test):.3f} "
        f"({time.perf_counter() - start:.0f}s), saved to {checkpoint}"
    )
    loaded, report = treenn.load_pretrained(checkpoint, new_head(fresh, k_head))
    print(
        f"loaded {len(report.loaded)} arrays; new: {report.missing}; not used: {report.unexpected}"
    )
    return loaded


def run_recipes(
    args: argparse.Namespace,
    loaded: ResNet,
    random_backbone: ResNet,
    new_train: Data,
    new_test: Data,
) -> None:
    """The four fine-tuning recipes (and the probe on a random backbone), the table, MC
    dropout and the figure."""
    recipes: dict[str, Callable[[], tuple[ResNet, Any, list[float]]]] = {
        "linear probe (random backbone)": lambda: train(
            treenn.freeze_backbone(random_backbone, "fc"),
            new_train,
            args.steps,
            "probe, random",
            args.seed,
        ),
        "linear probe": lambda: train(
            treenn.freeze_backbone(loaded, "fc"), new_train, args.steps, "probe", args.seed
        ),
        "BitFit": lambda: train(
            treenn.unfreeze(treenn.unfreeze(treenn.freeze(loaded), "**.bias"), "fc"),
            new_train,
            args.steps,
            "BitFit",
            args.seed,
        ),
        "gradual unfreezing": lambda: gradual(loaded, new_train, args.steps, args.seed),
        "full fine-tuning": lambda: train(loaded, new_train, args.steps, "full", args.seed),
    }
    print(f"\nfine-tuning on digits 5-9 ({args.steps} steps each)")
    print(f"| {'recipe':30} | test acc | trainable | time |")
    print(f"|{'-' * 32}|---------:|----------:|-----:|")
    curves: dict[str, list[float]] = {}
    results: dict[str, ResNet] = {}
    for name, run in recipes.items():
        start = time.perf_counter()
        model, _, losses = run()
        elapsed = time.perf_counter() - start
        curves[name], results[name] = losses, model
        print(
            f"| {name:30} | {accuracy(model, new_test):8.3f} | {count(model):9,d} | "
            f"{elapsed:3.0f}s |"
        )
    same = backbone_unchanged(results["linear probe"], loaded)
    print(f"\nlinear probe: backbone bit-identical to the checkpoint's: {'yes' if same else 'NO'}")

    entropy, correct = mc_dropout_entropy(
        results["full fine-tuning"], new_test, args.mc_samples, args.seed
    )
    wrong = entropy[~correct]
    print(
        f"MC dropout ({args.mc_samples} samples, full fine-tuning): mean predictive entropy "
        f"{entropy[correct].mean():.3f} on {correct.sum()} correct, "
        f"{wrong.mean() if wrong.size else float('nan'):.3f} on {wrong.size} wrong predictions"
    )
    figure = os.path.join(args.out, "finetune.png")
    plot(curves, entropy, correct, figure)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
