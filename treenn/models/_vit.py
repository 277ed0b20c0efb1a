"""Vision Transformers (timm's architecture and parameter names), channels-last."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._module import Module
from .._tree import replace_fields
from ..nn._attention import Attention
from ..nn._conv import Conv2d
from ..nn._dropout import Dropout, DropPath
from ..nn._init import sample
from ..nn._linear import MLP, Linear
from ..nn._normalization import LayerNorm
from ..nn._shapes import trailing


def _trunc_normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float = 0.02) -> jax.Array:
    return sample("truncated_normal", key, shape, scale=std)


def _timm_linear(linear: Linear, key: PRNGKeyArray) -> Linear:
    """timm's ViT init for Linear layers: truncated normal (std 0.02), zero bias."""
    bias = None if linear.bias is None else jnp.zeros_like(linear.bias)
    out: Linear = replace_fields(linear, weight=_trunc_normal(key, linear.weight.shape), bias=bias)
    return out


class PatchEmbed(Module):
    """Split an image into patches and embed them: a strided convolution `proj` (timm's
    `PatchEmbed`, so the weight is `patch_embed.proj.weight`).

    **Arguments:**

    - `patch_size`: side of the square patches (kernel size and stride of `proj`).
    - `in_channels`: image channels.
    - `dim`: embedding size.
    - `key`: PRNG key for the initialisation.

    **Returns:** `embed(x)` returns the patch tokens, `(*batch, (H // patch_size) * (W //
    patch_size), dim)` in row-major patch order, for channels-last images `x` of shape
    `(*batch, H, W, in_channels)`.

    !!! Example

        ```python
        embed = treenn.models.PatchEmbed(4, 3, 192, key=jax.random.key(0))
        tokens = embed(jnp.ones((8, 32, 32, 3)))  # (8, 64, 192)
        ```
    """

    proj: Conv2d

    def __init__(self, patch_size: int, in_channels: int, dim: int, *, key: PRNGKeyArray):
        self.proj = Conv2d(in_channels, dim, patch_size, stride=patch_size, key=key)

    def __call__(
        self, x: Float[Array, "*batch height width channels"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch patches dim"]:
        y = self.proj(x)
        return y.reshape((*y.shape[:-3], y.shape[-3] * y.shape[-2], y.shape[-1]))


class Block(Module):
    """A pre-norm transformer block: `x + drop_path1(attn(norm1(x)))`, then
    `x + drop_path2(mlp(norm2(x)))`, with timm's submodule names.

    **Arguments:**

    - `dim`: token size.
    - `num_heads`: attention heads; must divide `dim`.
    - `mlp_ratio`: hidden size of the MLP over `dim`.
    - `drop_path`: stochastic depth rate of both residual branches (`nn.DropPath`).
    - `key`: PRNG key for the initialisation (timm's: truncated normal Linear weights).

    **Returns:** `block(x, key=None)` returns an array of `x`'s shape `(*batch, tokens,
    dim)`. In training mode with `drop_path > 0` it needs `key`.

    !!! Example

        ```python
        block = treenn.models.Block(192, 3, 4.0, 0.1, key=jax.random.key(0))
        y = block(jnp.ones((8, 65, 192)), key=jax.random.key(1))  # (8, 65, 192)
        y = nn.eval_mode(block)(jnp.ones((8, 65, 192)))  # no key needed
        ```
    """

    norm1: LayerNorm
    attn: Attention
    drop_path1: DropPath
    norm2: LayerNorm
    mlp: MLP
    drop_path2: DropPath

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, *, key: PRNGKeyArray
    ):
        k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
        self.norm1 = LayerNorm(dim, eps=1e-6)
        attn = Attention(dim, num_heads, qkv_bias=True, key=k1)
        self.attn = replace_fields(
            attn, qkv=_timm_linear(attn.qkv, k2), proj=_timm_linear(attn.proj, k3)
        )
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        mlp = MLP(dim, int(dim * mlp_ratio), key=k4)
        self.mlp = replace_fields(mlp, fc1=_timm_linear(mlp.fc1, k5), fc2=_timm_linear(mlp.fc2, k6))
        self.drop_path2 = DropPath(drop_path)

    def __call__(
        self, x: Float[Array, "*batch tokens dim"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch tokens dim"]:
        keys: list[Any] = [None] * 4 if key is None else list(jax.random.split(key, 4))
        x = x + self.drop_path1(self.attn(self.norm1(x), key=keys[0]), key=keys[1])
        return x + self.drop_path2(self.mlp(self.norm2(x), key=keys[2]), key=keys[3])


class VisionTransformer(Module):
    """A ViT with timm's parameter names (`patch_embed.proj`, `cls_token`, `pos_embed`,
    `blocks.0.attn.qkv`, `blocks.0.mlp.fc1`, `norm`, `head`), taking channels-last images
    `(*batch, H, W, C)`. Classifies from the class token.

    Build one with `treenn.models.vit_tiny` / `vit_small`.

    **Arguments:**

    - `num_classes`: size of the `head`.
    - `img_size`, `patch_size`: square image and patch sizes (img_size divisible by it).
    - `in_channels`: image channels.
    - `dim`, `depth`, `num_heads`, `mlp_ratio`: transformer sizes.
    - `drop_rate`: dropout after the position embedding.
    - `drop_path_rate`: stochastic depth, rising linearly to this rate over the blocks.
    - `key`: PRNG key.

    Initialisation follows timm: truncated normal (std 0.02) for `pos_embed` and the
    Linear layers (zero biases), normal (std 1e-6) for `cls_token`.

    **Returns:** `model(x, key=None)` returns logits `(*batch, num_classes)` for images
    `x` of shape `(*batch, img_size, img_size, in_channels)`. A new model is in training
    mode: with `drop_rate` or `drop_path_rate` above 0 it needs `key` (or
    `nn.eval_mode` first).

    !!! Example

        ```python
        model = treenn.models.VisionTransformer(
            10, img_size=32, patch_size=4, dim=64, depth=2, num_heads=2,
            key=jax.random.key(0),
        )
        logits = model(jnp.ones((8, 32, 32, 3)))  # (8, 10)
        ```
    """

    patch_embed: PatchEmbed
    cls_token: Float[Array, "1 1 dim"]
    pos_embed: Float[Array, "1 tokens dim"]
    pos_drop: Dropout
    blocks: tuple[Block, ...]
    norm: LayerNorm
    head: Linear

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        key: PRNGKeyArray,
    ):
        if img_size % patch_size:
            raise ValueError(
                f"VisionTransformer: img_size={img_size} is not divisible by "
                f"patch_size={patch_size}"
            )
        keys = jax.random.split(key, 5)
        self.patch_embed = PatchEmbed(patch_size, in_channels, dim, key=keys[0])
        tokens = (img_size // patch_size) ** 2 + 1
        self.cls_token = sample("normal", keys[1], (1, 1, dim), scale=1e-6)
        self.pos_embed = _trunc_normal(keys[2], (1, tokens, dim))
        self.pos_drop = Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        block_keys = jax.random.split(keys[3], depth)
        self.blocks = tuple(
            Block(dim, num_heads, mlp_ratio, rate, key=k) for rate, k in zip(rates, block_keys)
        )
        self.norm = LayerNorm(dim, eps=1e-6)
        self.head = _timm_linear(Linear(dim, num_classes, key=keys[4]), keys[4])

    def __call__(
        self, x: Float[Array, "*batch height width channels"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch num_classes"]:
        keys: list[Any] = (
            [None] * (len(self.blocks) + 1)
            if key is None
            else list(jax.random.split(key, len(self.blocks) + 1))
        )
        tokens = self.patch_embed(x)
        batch = tokens.shape[:-2]
        cls = jnp.broadcast_to(self.cls_token[0], (*batch, 1, tokens.shape[-1]))
        tokens = jnp.concatenate([cls, tokens], axis=-2)
        if tokens.shape[-2] != self.pos_embed.shape[1]:
            raise ValueError(
                f"VisionTransformer: the image gives {tokens.shape[-2] - 1} patches, the "
                f"model was built for {self.pos_embed.shape[1] - 1} (check img_size)"
            )
        tokens = self.pos_drop(tokens + trailing(self.pos_embed[0], tokens.ndim), key=keys[-1])
        for block, k in zip(self.blocks, keys):
            tokens = block(tokens, key=k)
        return self.head(self.norm(tokens)[..., 0, :])

    def layer_groups(self) -> list[str | list[str]]:
        """The model's layers from input to output, for `treenn.layer_decay`: the
        embeddings (`patch_embed`, `cls_token`, `pos_embed`), then each block
        (`blocks.i`), the final `norm` with the last block, as timm's
        `VisionTransformer.group_matcher` puts it; the `head` follows them.

        **Returns:** a list of groups, each a path or a list of paths.

        !!! Example

            ```python
            model = treenn.models.vit_tiny(10, depth=2, key=jax.random.key(0))
            model.layer_groups()
            # [['patch_embed', 'cls_token', 'pos_embed'], 'blocks.0', ['blocks.1', 'norm']]
            ```
        """
        groups: list[list[str]] = [["patch_embed", "cls_token", "pos_embed"]]
        groups += [[f"blocks.{i}"] for i in range(len(self.blocks))]
        # timm matches the final norm "with the previous group" (MATCH_PREV_GROUP): the
        # last block's, or the embeddings' in a model without blocks.
        groups[-1].append("norm")
        return [group[0] if len(group) == 1 else group for group in groups]


def vit_tiny(num_classes: int = 1000, *, key: PRNGKeyArray, **kwargs: Any) -> VisionTransformer:
    """ViT-Tiny: dim 192, depth 12, 3 heads, with timm's parameter names.

    **Arguments:**

    - `num_classes`: size of the `head`.
    - `key`: PRNG key for the initialisation.
    - `**kwargs`: passed to `VisionTransformer` (`img_size`, `patch_size`, `depth`,
        `drop_path_rate`...).

    **Returns:** a `VisionTransformer` in training mode; `model(x)` maps `(*batch,
    img_size, img_size, C)` images to `(*batch, num_classes)` logits.

    !!! Example

        ```python
        model = treenn.models.vit_tiny(10, img_size=32, patch_size=4, key=jax.random.key(0))
        ```
    """
    options = {"dim": 192, "depth": 12, "num_heads": 3, **kwargs}
    return VisionTransformer(num_classes, key=key, **options)


def vit_small(num_classes: int = 1000, *, key: PRNGKeyArray, **kwargs: Any) -> VisionTransformer:
    """ViT-Small: dim 384, depth 12, 6 heads, with timm's parameter names.

    **Arguments:**

    - `num_classes`: size of the `head`.
    - `key`: PRNG key for the initialisation.
    - `**kwargs`: passed to `VisionTransformer` (`img_size`, `patch_size`, `depth`,
        `drop_path_rate`...).

    **Returns:** a `VisionTransformer` in training mode; `model(x)` maps `(*batch,
    img_size, img_size, C)` images to `(*batch, num_classes)` logits.

    !!! Example

        ```python
        model = treenn.models.vit_small(100, img_size=64, patch_size=8, key=jax.random.key(0))
        ```
    """
    options = {"dim": 384, "depth": 12, "num_heads": 6, **kwargs}
    return VisionTransformer(num_classes, key=key, **options)
