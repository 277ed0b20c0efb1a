"""Hand-written JAX baselines: the zoo's ResNets and ViTs as plain functions.

No modules and no pytree classes: each model is a function of flat dicts of arrays keyed
by treenn's dotted paths (`"layer1.0.conv1.weight"`), taken from a treenn model, so both
start from the very same weights. The arithmetic mirrors treenn's layers (PyTorch
layouts, channels-last, float32 statistics in the norms for half-precision inputs), so a
benchmark against them measures what treenn's machinery costs, not a different model.
The steps are `jax.jit` over the dicts, with `jax.value_and_grad` and optax as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from treenn._status import Status, status_of
from treenn._tree import dotted, flatten

Arrays = dict[str, jax.Array]


def arrays_of(model: Any) -> tuple[Arrays, Arrays]:
    """`(parameters, buffers)` of a treenn model, by dotted path."""
    params: Arrays = {}
    buffers: Arrays = {}
    paths, leaves, _ = flatten(model)
    for path, leaf in zip(paths, leaves):
        status = status_of(leaf)
        if status is Status.BUFFER:
            buffers[dotted(path)] = leaf.value
        elif status is Status.TRAINABLE:
            params[dotted(path)] = leaf
    return params, buffers


def cast(model: Any, dtype: Any) -> Any:
    """`model` with its trainable arrays cast to `dtype` (buffers stay float32)."""
    paths, leaves, treedef = flatten(model)
    leaves = [x.astype(dtype) if status_of(x) is Status.TRAINABLE else x for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _stats(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x


def _conv(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), [(padding, padding)] * 2, dimension_numbers=("NHWC", "OIHW", "NHWC")
    )


def _linear(p: Arrays, name: str, x: jax.Array) -> jax.Array:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


class _ResNet:
    """One forward pass; `new` collects the updated running statistics."""

    def __init__(self, p: Arrays, b: Arrays, train: bool):
        self.p, self.b, self.train = p, b, train
        self.new: Arrays = {}

    def bn(self, name: str, x: jax.Array) -> jax.Array:
        p, b = self.p, self.b
        xs = _stats(x)
        if self.train:
            mean = jnp.mean(xs, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xs - mean), axis=(0, 1, 2))
            n = xs.size // xs.shape[-1]
            old_mean, old_var = b[f"{name}.running_mean"], b[f"{name}.running_var"]
            self.new[f"{name}.running_mean"] = 0.9 * old_mean + 0.1 * mean
            self.new[f"{name}.running_var"] = 0.9 * old_var + 0.1 * var * (n / (n - 1))
        else:
            mean, var = b[f"{name}.running_mean"], b[f"{name}.running_var"]
        scale = jax.lax.rsqrt(var + 1e-5) * p[f"{name}.weight"].astype(var.dtype)
        shift = p[f"{name}.bias"].astype(var.dtype) - mean * scale
        return (xs * scale + shift).astype(x.dtype)

    def conv_bn(self, name: str, bn: str, x: jax.Array, stride: int) -> jax.Array:
        w = self.p[f"{name}.weight"]
        return self.bn(bn, _conv(x, w, stride, w.shape[-1] // 2))

    def block(self, name: str, x: jax.Array, stride: int) -> jax.Array:
        p = self.p
        bottleneck = f"{name}.conv3.weight" in p
        if bottleneck:
            out = jax.nn.relu(self.conv_bn(f"{name}.conv1", f"{name}.bn1", x, 1))
            out = jax.nn.relu(self.conv_bn(f"{name}.conv2", f"{name}.bn2", out, stride))
            out = self.conv_bn(f"{name}.conv3", f"{name}.bn3", out, 1)
        else:
            out = jax.nn.relu(self.conv_bn(f"{name}.conv1", f"{name}.bn1", x, stride))
            out = self.conv_bn(f"{name}.conv2", f"{name}.bn2", out, 1)
        if f"{name}.downsample.0.weight" in p:
            x = self.conv_bn(f"{name}.downsample.0", f"{name}.downsample.1", x, stride)
        return jax.nn.relu(out + x)

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.p
        small = p["conv1.weight"].shape[-1] == 3
        x = jax.nn.relu(self.conv_bn("conv1", "bn1", x, 1 if small else 2))
        if not small:
            pad = ((0, 0), (1, 1), (1, 1), (0, 0))
            x = jax.lax.reduce_window(
                x, np.array(-np.inf, x.dtype), jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pad
            )
        for stage in range(1, 5):
            blocks = sorted({int(k.split(".")[1]) for k in p if k.startswith(f"layer{stage}.")})
            for j in blocks:
                x = self.block(f"layer{stage}.{j}", x, 2 if stage > 1 and j == 0 else 1)
        return _linear(p, "fc", jnp.mean(x, axis=(1, 2)))


def resnet(p: Arrays, b: Arrays, x: jax.Array, *, train: bool) -> tuple[jax.Array, Arrays]:
    """`(logits, updated buffers)` of a treenn.models ResNet given by its arrays."""
    net = _ResNet(p, b, train)
    logits = net(x)
    return logits, {**b, **net.new}


def _layer_norm(p: Arrays, name: str, x: jax.Array) -> jax.Array:
    xs = _stats(x)
    mean = jnp.mean(xs, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xs - mean), axis=-1, keepdims=True)
    y = (xs - mean) * jax.lax.rsqrt(var + 1e-6)
    y = y * p[f"{name}.weight"].astype(y.dtype) + p[f"{name}.bias"].astype(y.dtype)
    return y.astype(x.dtype)


def vit(p: Arrays, b: Arrays, x: jax.Array, *, heads: int) -> tuple[jax.Array, Arrays]:
    """`(logits, buffers)` of a treenn.models VisionTransformer given by its arrays."""
    w = p["patch_embed.proj.weight"]
    t = _conv(x, w, w.shape[-1], 0) + p["patch_embed.proj.bias"]
    n, dim = t.shape[0], t.shape[-1]
    t = t.reshape((n, -1, dim))
    cls = jnp.broadcast_to(p["cls_token"][0], (n, 1, dim))
    t = jnp.concatenate([cls, t], axis=1) + p["pos_embed"]
    tokens = t.shape[1]
    depth = len({k.split(".")[1] for k in p if k.startswith("blocks.")})
    for i in range(depth):
        name = f"blocks.{i}"
        h = _layer_norm(p, f"{name}.norm1", t)
        qkv = _linear(p, f"{name}.attn.qkv", h).reshape((n, tokens, 3, heads, dim // heads))
        o = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        t = t + _linear(p, f"{name}.attn.proj", o.reshape((n, tokens, dim)))
        h = _layer_norm(p, f"{name}.norm2", t)
        h = jax.nn.gelu(_linear(p, f"{name}.mlp.fc1", h), approximate=False)
        t = t + _linear(p, f"{name}.mlp.fc2", h)
    return _linear(p, "head", _layer_norm(p, "norm", t)[:, 0]), b


Forward = Callable[..., tuple[jax.Array, Arrays]]


def train_step(forward: Forward, tx: Any, **options: Any) -> Any:
    """A hand-written `jax.jit` training step of `forward`:
    `step(params, buffers, opt_state, x, y) -> (params, buffers, opt_state, loss)`."""

    def loss_fn(params: Arrays, buffers: Arrays, x: jax.Array, y: jax.Array) -> Any:
        logits, buffers = forward(params, buffers, x, **options)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
        return loss.mean(), buffers

    def step(params: Arrays, buffers: Arrays, opt: Any, x: jax.Array, y: jax.Array) -> Any:
        (loss, buffers), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, buffers, x, y)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), buffers, opt, loss

    return step


def xent(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """The same loss for a treenn model (for `treenn.train_step`)."""
    logits = model(x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
