"""Sharded fine-tuning with treenn on JAX's own machinery: data parallel plus FSDP.

A small-input ResNet-18 (`treenn.models`) is fine-tuned on scikit-learn's digits over a
device mesh with one axis, "data": every global batch is split over it (data
parallelism; BatchNorm statistics are the global batch's, as XLA all-reduces them), and
every convolution weight is split over it too (fully-sharded data parallelism: each
device holds 1/n of each weight, gathered when used). The placement is written as rules
in the `where=` language, and everything else is `jax.sharding`:

1. a stand-in "pretrained" checkpoint is loaded straight into the sharded placement
   (`treenn.load(path, like=treenn.shard(...))`); the stem is frozen, its BatchNorm pinned
   in eval;
2. the optimiser state, created from the sharded model, is sharded like it;
3. the README's training step trains, with one addition: its outputs go through
   `treenn.shard` (inside a compiled step, a sharding constraint), so the model and the
   optimiser state come back placed as the rules say;
4. the first step is checked against a single-device run (loss, parameters, BatchNorm
   statistics), and the fine-tuned model is saved and reloaded, placement included.

On one machine the devices are simulated CPU devices (`--devices`, default 8). On
several hosts, run the same command on each with `--coordinator HOST:PORT
--num-processes N --process-id I` (see docs/guides/sharding.md): each process then loads
only its share of every batch.

    python examples/sharded.py [--devices 8] [--steps 100] [--out runs/sharded] [--quick]

Outputs go to the `--out` folder (default `runs/sharded/`, created if missing): the
stand-in pretrained checkpoint and the fine-tuned model, both `.safetensors` files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sharded", help="output folder")
    parser.add_argument("--quick", action="store_true", help="a few steps, for CI")
    parser.add_argument("--coordinator", help="multi-host: address of process 0, HOST:PORT")
    parser.add_argument("--num-processes", type=int, default=1, help="multi-host")
    parser.add_argument("--process-id", type=int, default=0, help="multi-host")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.coordinator is None and "jax" not in sys.modules:
    # Simulated devices: XLA reads this once, when JAX starts.
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={ARGS.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import treenn  # noqa: E402
import treenn.nn as nn  # noqa: E402
from treenn.models import ResNet, resnet18  # noqa: E402

WIDTH = 16  # ResNet-18 with 16-32-64-128 channels: small images, small model

# First matching rule wins. BatchNorm's small vectors are replicated; every other weight
# is split along its first axis (output channels), the head along its input features
# (10 classes do not split 8 ways). `treenn.shard` names any array a rule does not fit.
# Written with "**." so that they also place the optimiser state, whose paths are the
# parameters' behind a prefix ("0.mu.layer1.0.conv1.weight").
RULES = {
    nn.BatchNorm: P(),
    "**.fc.weight": P(None, "data"),
    "**.weight": P("data"),
    "**": P(),
}


def make_model(seed: int) -> ResNet:
    return resnet18(10, in_channels=1, width=WIDTH, small_input=True, key=jax.random.key(seed))


def xent(model: ResNet, x: jax.Array, y: jax.Array, key: jax.Array) -> Any:
    """Loss and the model with updated BatchNorm statistics, as in the README."""
    logits, model = treenn.apply(model, x, key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), model


def make_step(tx: Any, mesh: Mesh | None) -> Any:
    """The README's training step; on a mesh, its outputs are placed by the rules."""

    @treenn.jit
    def step(model: ResNet, opt_state: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> Any:
        (loss, model), grads = treenn.value_and_grad(xent, has_aux=True)(model, x, y, key)
        updates, opt_state = tx.update(grads, opt_state, treenn.trainable(model))
        model = treenn.apply_updates(model, updates)
        if mesh is not None:  # else XLA may leave an array wherever its partitioner chose
            model, opt_state = treenn.shard((model, opt_state), mesh, RULES)
        return model, opt_state, loss

    return step


def global_batch(mesh: Mesh, *local: np.ndarray) -> tuple[jax.Array, ...]:
    """One global array per input, split over "data", from this process's rows. On one
    process that is the whole batch (`treenn.shard(batch, mesh, P("data"))` does the
    same there); on several, each process passes only its own share."""
    sharding = NamedSharding(mesh, P("data"))
    return tuple(jax.make_array_from_process_local_data(sharding, x) for x in local)


def my_rows(n: int) -> slice:
    """This process's share of `n` global rows."""
    share = n // jax.process_count()
    return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def arrays(tree: Any) -> list[jax.Array]:
    """The arrays of a model (its other leaves, such as `inference` flags, left out)."""
    return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]


def per_device_bytes(model: Any) -> tuple[int, int]:
    """Bytes of model arrays held by the first device, and in the whole model."""
    device = jax.devices()[0]
    held = sum(
        s.data.nbytes for x in arrays(model) for s in x.addressable_shards if s.device == device
    )
    return held, sum(x.nbytes for x in arrays(model))


def largest_difference(a: Any, b: Any) -> float:
    pairs = zip(arrays(a), arrays(b))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def main() -> None:
    if ARGS.coordinator is not None:
        jax.distributed.initialize(ARGS.coordinator, ARGS.num_processes, ARGS.process_id)
    leader = jax.process_index() == 0
    say = print if leader else (lambda *_: None)
    steps = 10 if ARGS.quick else ARGS.steps
    os.makedirs(ARGS.out, exist_ok=True)
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
    say(f"mesh: {n} devices on {jax.process_count()} process(es), axis 'data'")
    if ARGS.batch % n:
        raise SystemExit(f"--batch {ARGS.batch} does not split over {n} devices")

    images, labels = load_digits(return_X_y=True)
    x_all = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y_all = labels.astype(np.int32)
    order = np.random.default_rng(ARGS.seed).permutation(len(x_all))
    test = order[: (len(order) // 4) // n * n]  # a multiple of the device count
    train = order[len(test) :]

    # 1. The checkpoint stands in for pretrained weights; it loads into the placement.
    checkpoint = os.path.join(ARGS.out, "pretrained.safetensors")
    if leader:
        treenn.save(checkpoint, make_model(ARGS.seed))
    multihost_utils.sync_global_devices("checkpoint written")
    model = treenn.load(checkpoint, like=treenn.shard(make_model(ARGS.seed + 1), mesh, RULES))
    model = treenn.freeze(model, lambda m: (m.conv1, m.bn1))
    model = nn.eval_mode(model, "bn1", pin=True)
    held, total = per_device_bytes(model)
    say(f"model arrays: {total / 1024:.0f} KiB in all, {held / 1024:.0f} KiB on each device")

    # 2. The optimiser state follows the parameters' placement; the rules place the rest
    # of it (Adam's step count, which tx.init leaves on one device).
    tx = optax.adam(3e-3)
    opt_state = treenn.shard(tx.init(treenn.trainable(model)), mesh, RULES)
    mu = opt_state[0].mu.layer2[0].conv1.weight
    say(f"Adam moment of layer2.0.conv1.weight: {mu.sharding.spec}, like its parameter")

    # 3. Train: XLA partitions the step over the mesh from the arrays' placement.
    step = make_step(tx, mesh)
    rng = np.random.default_rng(ARGS.seed + 1)  # the same batches on every process
    start = time.perf_counter()
    first: list[Any] = []
    for i in range(steps):
        rows = rng.choice(train, ARGS.batch)[my_rows(ARGS.batch)]
        x, y = global_batch(mesh, x_all[rows], y_all[rows])
        inputs = (model, opt_state, x, y, jax.random.key(i))
        model, opt_state, loss = step(*inputs)
        if i == 0:
            first = [inputs, (model, opt_state, loss)]
        if i % max(steps // 5, 1) == 0 or i == steps - 1:
            say(f"step {i:4d}  loss {float(loss):.4f}")
    elapsed = time.perf_counter() - start
    say(f"{steps} steps in {elapsed:.1f} s (compilation included)")

    predict = treenn.eval_step(lambda m, x: m(x).argmax(-1))
    (x_test,) = global_batch(mesh, x_all[test][my_rows(len(test))])
    guesses = multihost_utils.process_allgather(predict(model, x_test), tiled=True)
    say(f"test accuracy {np.mean(guesses == y_all[test]):.3f} on {len(test)} digits")
    spec = model.layer4[1].conv2.weight.sharding.spec
    say(f"after training: layer4.1.conv2.weight still {spec}")

    # 4. Same numbers as on one device; checkpoints keep values and placement.
    if jax.process_count() == 1:
        check_against_one_device(first[0], first[1], tx)
        path = os.path.join(ARGS.out, "finetuned.safetensors")
        treenn.save(path, model)
        again = treenn.load(path, like=model)
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == b.sharding
            for a, b in zip(arrays(again), arrays(model))
        )
        say(f"saved and reloaded, values and placement identical: {'yes' if same else 'NO'}")
    else:  # every process holds only its shards: gather them, then one process writes
        host = multihost_utils.process_allgather(model, tiled=True)
        if leader:
            path = os.path.join(ARGS.out, "finetuned.safetensors")
            treenn.save(path, host)
            say(f"saved {path}, gathered from {jax.process_count()} processes")


def check_against_one_device(inputs: Any, outputs: Any, tx: Any) -> None:
    """Rerun the first step on one device: loss, gradients, BatchNorm statistics."""
    one = make_step(tx, None)(*jax.device_get(inputs))  # host copies: one device
    mesh_model, mesh_state, mesh_loss = outputs
    # After Adam's first step its first moment is (1 - b1) * gradient = 0.1 * gradient.
    grads = lambda state: jax.tree.map(lambda m: 10 * m, state[0].mu)  # noqa: E731
    stats = lambda m: (m.layer1[0].bn1.running_mean, m.layer1[0].bn1.running_var)  # noqa: E731
    largest = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads(one[1])))
    grad_diff = largest_difference(grads(mesh_state), grads(one[1]))
    print(
        f"first step, mesh vs one device: loss {float(mesh_loss):.6f} vs {float(one[2]):.6f}; "
        f"largest difference in gradients {grad_diff:.1e} (largest gradient {largest:.1e}), "
        f"in BatchNorm statistics {largest_difference(stats(mesh_model), stats(one[0])):.1e}"
    )


if __name__ == "__main__":
    main()
