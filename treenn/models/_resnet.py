"""ResNets (torchvision's architecture and parameter names), channels-last."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._module import Module
from .._tree import replace_fields
from ..nn._conv import Conv2d
from ..nn._init import sample
from ..nn._linear import Linear
from ..nn._normalization import BatchNorm
from ..nn._pooling import MaxPool2d


def _conv(cin: int, cout: int, size: int, stride: int, key: PRNGKeyArray) -> Conv2d:
    """A bias-free conv with torchvision's init: kaiming normal, fan_out, relu gain."""
    conv = Conv2d(cin, cout, size, stride=stride, padding=size // 2, bias=False, key=key)
    std = math.sqrt(2.0 / (cout * size * size))
    weight = sample("normal", key, conv.weight.shape, conv.weight.dtype, scale=std)
    return _with_weight(conv, weight)


def _with_weight(conv: Conv2d, weight: jax.Array) -> Conv2d:
    out: Conv2d = replace_fields(conv, weight=weight)
    return out


def _downsample(cin: int, cout: int, stride: int, key: PRNGKeyArray) -> tuple[Conv2d, BatchNorm]:
    return (_conv(cin, cout, 1, stride, key), BatchNorm(cout))


def _shortcut(down: tuple[Conv2d, BatchNorm] | None, x: jax.Array) -> jax.Array:
    if down is None:
        return x
    conv, bn = down
    return bn(conv(x))


class BasicBlock(Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34), torchvision's
    `BasicBlock`: `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`.

    **Arguments:**

    - `cin`: input channels.
    - `width`: output channels (`expansion = 1`).
    - `stride`: stride of `conv1`; with `stride != 1` or `cin != width` the shortcut is
        `downsample`, a strided 1x1 convolution and a BatchNorm.
    - `key`: PRNG key for the initialisation.

    **Returns:** `block(x)` returns `(*batch, H / stride, W / stride, width)` (rounded
    up) for channels-last `x` of shape `(*batch, H, W, cin)`. Its BatchNorms train like
    any `nn.BatchNorm`: in training mode call it through `treenn.apply`.

    !!! Example

        ```python
        block = treenn.models.BasicBlock(64, 128, 2, key=jax.random.key(0))
        y, block = treenn.apply(block, jnp.ones((8, 32, 32, 64)))  # (8, 16, 16, 128)
        ```
    """

    conv1: Conv2d
    bn1: BatchNorm
    conv2: Conv2d
    bn2: BatchNorm
    downsample: tuple[Conv2d, BatchNorm] | None
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = _conv(cin, width, 3, stride, k1)
        self.bn1 = BatchNorm(width)
        self.conv2 = _conv(width, width, 3, 1, k2)
        self.bn2 = BatchNorm(width)
        needs = stride != 1 or cin != width
        self.downsample = _downsample(cin, width, stride, k3) if needs else None

    def __call__(
        self, x: Float[Array, "*batch h w c"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch h2 w2 c2"]:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return jax.nn.relu(out + _shortcut(self.downsample, x))


class Bottleneck(Module):
    """1x1, 3x3 (strided), 1x1 convolutions with a residual connection (ResNet-50),
    torchvision's `Bottleneck` (stride on the 3x3, as torchvision's "ResNet v1.5").

    **Arguments:**

    - `cin`: input channels.
    - `width`: channels of the inner convolutions; the output has `width * 4`
        (`expansion = 4`).
    - `stride`: stride of `conv2`; with `stride != 1` or `cin != 4 * width` the shortcut
        is `downsample`, a strided 1x1 convolution and a BatchNorm.
    - `key`: PRNG key for the initialisation.

    **Returns:** `block(x)` returns `(*batch, H / stride, W / stride, 4 * width)`
    (rounded up) for channels-last `x` of shape `(*batch, H, W, cin)`. In training mode
    call it through `treenn.apply` (its BatchNorms update their statistics).

    !!! Example

        ```python
        block = treenn.models.Bottleneck(256, 64, 1, key=jax.random.key(0))
        y, block = treenn.apply(block, jnp.ones((8, 14, 14, 256)))  # (8, 14, 14, 256)
        ```
    """

    conv1: Conv2d
    bn1: BatchNorm
    conv2: Conv2d
    bn2: BatchNorm
    conv3: Conv2d
    bn3: BatchNorm
    downsample: tuple[Conv2d, BatchNorm] | None
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, *, key: PRNGKeyArray):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        cout = width * self.expansion
        self.conv1 = _conv(cin, width, 1, 1, k1)
        self.bn1 = BatchNorm(width)
        self.conv2 = _conv(width, width, 3, stride, k2)
        self.bn2 = BatchNorm(width)
        self.conv3 = _conv(width, cout, 1, 1, k3)
        self.bn3 = BatchNorm(cout)
        needs = stride != 1 or cin != cout
        self.downsample = _downsample(cin, cout, stride, k4) if needs else None

    def __call__(
        self, x: Float[Array, "*batch h w c"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch h2 w2 c2"]:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return jax.nn.relu(out + _shortcut(self.downsample, x))


class ResNet(Module):
    """A ResNet with torchvision's parameter names (`conv1`, `bn1`, `layer1.0.conv1`,
    `layer2.0.downsample.0`, `fc`), taking channels-last images `(*batch, H, W, C)`.

    Build one with `treenn.models.resnet18` / `resnet34` / `resnet50`.

    **Arguments:**

    - `block`: `BasicBlock` or `Bottleneck`.
    - `layers`: blocks per stage, e.g. `(2, 2, 2, 2)`.
    - `num_classes`: size of the `fc` head.
    - `in_channels`: image channels.
    - `width`: channels of the first stage (torchvision: 64); stages double it.
    - `small_input`: a 3x3 stride-1 stem without max pooling, for 8x8-32x32 images
        (CIFAR-style), instead of the 7x7 stride-2 stem and 3x3 max pool.
    - `key`: PRNG key.

    Initialisation follows torchvision: convolutions kaiming-normal (fan out), BatchNorm
    weight 1 and bias 0, `fc` PyTorch's Linear default.

    **Returns:** `model(x)` returns logits `(*batch, num_classes)` for images `x` of
    shape `(*batch, H, W, in_channels)`. A new model is in training mode, whose
    BatchNorms update their statistics: call it through `treenn.apply` (which also
    returns the updated model), or switch it with `nn.eval_mode` first.

    !!! Example

        ```python
        model = treenn.models.ResNet(
            treenn.models.BasicBlock, (1, 1, 1, 1), 10, width=16, small_input=True,
            key=jax.random.key(0),
        )
        logits, model = treenn.apply(model, jnp.ones((8, 32, 32, 3)))  # (8, 10)
        logits = nn.eval_mode(model)(jnp.ones((8, 32, 32, 3)))
        ```
    """

    conv1: Conv2d
    bn1: BatchNorm
    maxpool: MaxPool2d | None
    layer1: tuple[Any, ...]
    layer2: tuple[Any, ...]
    layer3: tuple[Any, ...]
    layer4: tuple[Any, ...]
    fc: Linear

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        in_channels: int = 3,
        width: int = 64,
        small_input: bool = False,
        key: PRNGKeyArray,
    ):
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"ResNet(layers={tuple(layers)}): expected four positive counts")
        keys = jax.random.split(key, 6)
        if small_input:
            self.conv1 = _conv(in_channels, width, 3, 1, keys[0])
            self.maxpool = None
        else:
            self.conv1 = _conv(in_channels, width, 7, 2, keys[0])
            self.maxpool = MaxPool2d(3, stride=2, padding=1)
        self.bn1 = BatchNorm(width)
        cin = width
        stages = []
        for i, (count, stage_key) in enumerate(zip(layers, keys[1:5])):
            stage_width = width * 2**i
            stride = 1 if i == 0 else 2
            block_keys = jax.random.split(stage_key, count)
            blocks = []
            for j in range(count):
                blocks.append(block(cin, stage_width, stride if j == 0 else 1, key=block_keys[j]))
                cin = stage_width * block.expansion
            stages.append(tuple(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = Linear(cin, num_classes, key=keys[5])

    def __call__(
        self, x: Float[Array, "*batch height width channels"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch num_classes"]:
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return self.fc(jnp.mean(x, axis=(-3, -2)), key=key)

    def layer_groups(self) -> list[str | list[str]]:
        """The model's layers from input to output, for `treenn.layer_decay`: the stem
        (`conv1`, `bn1`), then each block (`layer1.0`, `layer1.1`, ...), as timm's
        `ResNet.group_matcher(coarse=False)`; `fc` (the head) follows them.

        **Returns:** a list of groups, each a path or a list of paths.

        !!! Example

            ```python
            model = treenn.models.resnet18(10, key=jax.random.key(0))
            model.layer_groups()[:3]  # [['conv1', 'bn1'], 'layer1.0', 'layer1.1']
            ```
        """
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        blocks = [f"layer{s}.{i}" for s, stage in enumerate(stages, 1) for i in range(len(stage))]
        return [["conv1", "bn1"], *blocks]


def resnet18(num_classes: int = 1000, *, key: PRNGKeyArray, **kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2), with torchvision's parameter names.

    **Arguments:**

    - `num_classes`: size of the `fc` head.
    - `key`: PRNG key for the initialisation.
    - `**kwargs`: passed to `ResNet` (`in_channels`, `width`, `small_input`).

    **Returns:** a `ResNet` in training mode; `model(x)` maps `(*batch, H, W, C)` images
    to `(*batch, num_classes)` logits.

    !!! Example

        ```python
        model = treenn.models.resnet18(10, small_input=True, key=jax.random.key(0))
        logits, model = treenn.apply(model, jnp.ones((8, 32, 32, 3)))
        ```
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, key=key, **kwargs)


def resnet34(num_classes: int = 1000, *, key: PRNGKeyArray, **kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3), with torchvision's parameter names.

    **Arguments:**

    - `num_classes`: size of the `fc` head.
    - `key`: PRNG key for the initialisation.
    - `**kwargs`: passed to `ResNet` (`in_channels`, `width`, `small_input`).

    **Returns:** a `ResNet` in training mode; `model(x)` maps `(*batch, H, W, C)` images
    to `(*batch, num_classes)` logits.

    !!! Example

        ```python
        model = treenn.models.resnet34(100, key=jax.random.key(0))
        ```
    """
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, key=key, **kwargs)


def resnet50(num_classes: int = 1000, *, key: PRNGKeyArray, **kwargs: Any) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3), with torchvision's parameter names.

    **Arguments:**

    - `num_classes`: size of the `fc` head.
    - `key`: PRNG key for the initialisation.
    - `**kwargs`: passed to `ResNet` (`in_channels`, `width`, `small_input`).

    **Returns:** a `ResNet` in training mode; `model(x)` maps `(*batch, H, W, C)` images
    to `(*batch, num_classes)` logits.

    !!! Example

        ```python
        model = treenn.models.resnet50(1000, key=jax.random.key(0))
        ```
    """
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, key=key, **kwargs)
