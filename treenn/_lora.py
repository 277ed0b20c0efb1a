"""LoRA by tree surgery: `treenn.lora`, `treenn.merge_lora` and adapter-only checkpoints.

An adapted layer is an instance of a statically defined subclass of its layer class
(`LoRALinear` is an `nn.Linear`), so `isinstance`, paths and pickling keep working. It
holds the layer's own fields (weight and bias frozen, paths unchanged) plus `lora_A`,
`lora_B` (PEFT's layouts), `lora_dropout` (an `nn.Dropout`, or `nn.Identity` when
`dropout=0`, as in PEFT) and the static `scaling = alpha / rank`.

A layer stacked with `eqx.filter_vmap` (weights with leading stack axes, used under
`eqx.filter_vmap` or `lax.scan`) gets adapters with the same leading axes, so that each
slice is an adapted layer. `adapter_edit` is the per-layer edit, `(path, layer) -> new
layer`, which `lora`'s walk applies to the layers it selects.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._edit import Edit, edit
from ._module import Module, build
from ._remat import base_class, policy_of, remat_class
from ._selectors import Where, no_match
from ._status import Frozen, Quantized, is_array_like, is_inexact, marked_like, unmarked
from ._tree import by_type, check_model, dotted, modules, state_of
from .nn._attention import MultiheadAttention
from .nn._conv import Conv1d, Conv2d, Conv3d, _ConvNd
from .nn._dropout import Dropout
from .nn._init import torch_uniform
from .nn._linear import Identity, Linear

T = TypeVar("T")


class _Adapter(Module):
    """Fields and merging shared by every adapted layer.

    `lora_A` is `(rank, in_features)` (convolutions: `(rank, in_channels, *kernel)`),
    `lora_B` is `(out_features, rank)` (convolutions: `(out_channels, rank, 1, ...)`);
    the adapter adds `scaling * lora_B(lora_A(lora_dropout(x)))` to the layer's output.
    """

    lora_A: Float[Array, "rank ..."]
    lora_B: Float[Array, "out rank ..."]
    lora_dropout: Dropout | Identity
    scaling: float = eqx.field(static=True)

    # The field the adapter is folded into by `merge_lora`.
    _merged_field = "weight"

    def _delta_weight(self) -> jax.Array:
        """`scaling * lora_B @ lora_A`, shaped like the merged weight, in float32 (float64
        when an adapter is): per slice for a stacked layer."""
        a, b = self.lora_A, self.lora_B
        dtype = jnp.float64 if jnp.float64 in (a.dtype, b.dtype) else jnp.float32
        # Stack axes lead (eqx.filter_vmap); then rank and the layer's own axes.
        lead = a.ndim - 2 - getattr(self, "num_spatial_dims", 0)
        stack, rank, out = a.shape[:lead], a.shape[lead], b.shape[lead]
        down = a.reshape((*stack, rank, -1)).astype(dtype)
        delta = b.reshape((*stack, out, rank)).astype(dtype) @ down
        base = getattr(self, self._merged_field)
        return (delta * self.scaling).reshape(base.shape)

    def _adapter_input(self, x: jax.Array, key: PRNGKeyArray | None) -> jax.Array:
        """The adapter's input: `x` in the adapters' dtype (PEFT casts it so too),
        through `lora_dropout`."""
        return self.lora_dropout(x.astype(self.lora_A.dtype), key=self._key(key))

    def _key(self, key: PRNGKeyArray | None) -> PRNGKeyArray | None:
        dropout = self.lora_dropout
        if key is None and isinstance(dropout, Dropout) and not dropout.inference:
            raise ValueError(
                f"{type(self).__name__}: the LoRA adapter's dropout (lora_dropout, "
                f"p={dropout.p}) is in training mode and needs `key=`; the layer was called "
                "without one. Call the model with a key, use lora(..., dropout=0.0), or "
                "switch the adapters to evaluation mode: nn.eval_mode(model, '**.lora_dropout')"
            )
        return key


def _view(cls: type, layer: Any, **changes: Any) -> Any:
    """`layer`'s base fields (not the adapter's) as a `cls` instance, some changed."""
    state = {k: v for k, v in state_of(layer).items() if k not in _ADAPTER_FIELDS}
    state.update(changes)
    return build(cls, state)


_ADAPTER_FIELDS = frozenset({"lora_A", "lora_B", "lora_dropout", "scaling"})


def _wider(a: Any, b: Any) -> Any:
    """The dtype both `a` and `b` promote to (standard promotion: float32 for bfloat16
    and float16), whatever the caller's promotion mode."""
    if a == b:
        return a
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(a, b)


def _plus(y: jax.Array, delta: jax.Array) -> jax.Array:
    """`y + delta` computed in the wider dtype, in `y`'s dtype (the base layer's output
    dtype, as PEFT returns), so that a float32 adapter works on a bfloat16 base under
    strict dtype promotion."""
    if y.dtype == delta.dtype:
        return y + delta
    wide = _wider(y.dtype, delta.dtype)
    return (y.astype(wide) + delta.astype(wide)).astype(y.dtype)


def _merged(weight: jax.Array, delta: jax.Array) -> jax.Array:
    """`weight + delta` computed in the wider dtype (`delta` is float32 at least),
    rounded once to `weight`'s."""
    wide = _wider(weight.dtype, delta.dtype)
    return (weight.astype(wide) + delta.astype(wide)).astype(weight.dtype)


def _matmul_out(h: jax.Array, b: jax.Array, axis: int) -> jax.Array:
    """`lora_B` as a 1x1 convolution (or a Linear): contract `h`'s feature `axis`."""
    b2 = b.reshape((b.shape[0], b.shape[1]))
    return jnp.moveaxis(jnp.tensordot(h, b2, axes=((axis,), (1,))), -1, axis)


# -- treenn's layers --------------------------------------------------------------------


class LoRALinear(_Adapter, Linear):
    """An `nn.Linear` with a LoRA adapter (made by `treenn.lora`)."""

    def __call__(
        self, x: Float[Array, "*batch in_features"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch out_features"]:
        y = Linear.__call__(self, x)
        h = self._adapter_input(x, key)
        return _plus(y, (h @ self.lora_A.T) @ self.lora_B.T * self.scaling)


class _LoRAConvNd(_Adapter):
    """`lora_A` is a convolution with the layer's kernel, stride, padding and dilation
    to `rank` channels, `lora_B` a 1x1 convolution (PEFT's)."""

    def _adapted(self, base: Any, x: jax.Array, key: PRNGKeyArray | None) -> jax.Array:
        y = base._forward(self, x)
        h = self._adapter_input(x, key)
        rank = self.lora_A.shape[0]
        down = _view(base, self, weight=self.lora_A, bias=None, out_channels=rank, groups=1)
        h = down._forward(h)
        return _plus(y, _matmul_out(h, self.lora_B, -1) * self.scaling)


class LoRAConv1d(_LoRAConvNd, Conv1d):
    """An `nn.Conv1d` with a LoRA adapter (made by `treenn.lora`)."""

    def __call__(
        self, x: Float[Array, "*batch length in_channels"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch out_length out_channels"]:
        return self._adapted(Conv1d, x, key)


class LoRAConv2d(_LoRAConvNd, Conv2d):
    """An `nn.Conv2d` with a LoRA adapter (made by `treenn.lora`)."""

    def __call__(
        self,
        x: Float[Array, "*batch height width in_channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_height out_width out_channels"]:
        return self._adapted(Conv2d, x, key)


class LoRAConv3d(_LoRAConvNd, Conv3d):
    """An `nn.Conv3d` with a LoRA adapter (made by `treenn.lora`)."""

    def __call__(
        self,
        x: Float[Array, "*batch depth height width in_channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch out_depth out_height out_width out_channels"]:
        return self._adapted(Conv3d, x, key)


class LoRAMultiheadAttention(_Adapter, MultiheadAttention):
    """An `nn.MultiheadAttention` whose fused input projection `in_proj_weight` has a
    LoRA adapter (made by `treenn.lora`); `out_proj` gets its own (a `LoRALinear`).

    As in PEFT, the in-projection adapter is folded into `in_proj_weight` for the call,
    so it takes no dropout.
    """

    _merged_field = "in_proj_weight"

    def __call__(self, query: Any, kv: Any = None, value: Any = None, **kwargs: Any) -> Any:
        assert self.in_proj_weight is not None
        merged = _merged(self.in_proj_weight, self._delta_weight())
        base = _view(MultiheadAttention, self, in_proj_weight=merged)
        return MultiheadAttention.__call__(base, query, kv, value, **kwargs)


# -- Equinox's layers (unbatched, channels-first) -------------------------------------


class LoRAEqxLinear(_Adapter, eqx.nn.Linear):
    """An `equinox.nn.Linear` with a LoRA adapter (made by `treenn.lora`)."""

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        y = eqx.nn.Linear.__call__(self, x)
        h = self._adapter_input(x, key)
        h = jnp.reshape(h, (1,)) if self.in_features == "scalar" else h
        delta = self.lora_B @ (self.lora_A @ h) * self.scaling
        return _plus(y, delta[0] if self.out_features == "scalar" else delta)


class _LoRAEqxConv(_Adapter):
    def _adapted(self, base: type, x: jax.Array, key: PRNGKeyArray | None) -> jax.Array:
        y = base.__call__(self, x)
        h = self._adapter_input(x, key)
        rank = self.lora_A.shape[0]
        down = _view(
            base, self, weight=self.lora_A, bias=None, use_bias=False, out_channels=rank, groups=1
        )
        return _plus(y, _matmul_out(down(h), self.lora_B, 0) * self.scaling)


class LoRAEqxConv(_LoRAEqxConv, eqx.nn.Conv):
    """An `equinox.nn.Conv` with a LoRA adapter (made by `treenn.lora`)."""

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        return self._adapted(eqx.nn.Conv, x, key)


class LoRAEqxConv1d(_LoRAEqxConv, eqx.nn.Conv1d):
    """An `equinox.nn.Conv1d` with a LoRA adapter (made by `treenn.lora`)."""

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        return self._adapted(eqx.nn.Conv1d, x, key)


class LoRAEqxConv2d(_LoRAEqxConv, eqx.nn.Conv2d):
    """An `equinox.nn.Conv2d` with a LoRA adapter (made by `treenn.lora`)."""

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        return self._adapted(eqx.nn.Conv2d, x, key)


class LoRAEqxConv3d(_LoRAEqxConv, eqx.nn.Conv3d):
    """An `equinox.nn.Conv3d` with a LoRA adapter (made by `treenn.lora`)."""

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        return self._adapted(eqx.nn.Conv3d, x, key)


# Layer class -> its adapted class (exact classes: a user's subclass may call its
# weight differently, so it is refused rather than silently adapted wrongly).
ADAPTED: dict[type, type] = {
    Linear: LoRALinear,
    Conv1d: LoRAConv1d,
    Conv2d: LoRAConv2d,
    Conv3d: LoRAConv3d,
    MultiheadAttention: LoRAMultiheadAttention,
    eqx.nn.Linear: LoRAEqxLinear,
    eqx.nn.Conv: LoRAEqxConv,
    eqx.nn.Conv1d: LoRAEqxConv1d,
    eqx.nn.Conv2d: LoRAEqxConv2d,
    eqx.nn.Conv3d: LoRAEqxConv3d,
}
BASE: dict[type, type] = {adapted: base for base, adapted in ADAPTED.items()}
_ADAPTABLE = (Linear, _ConvNd, MultiheadAttention, eqx.nn.Linear, eqx.nn.Conv)
_STOP_LAYER = by_type(lambda kind: issubclass(kind, _ADAPTABLE))
_KINDS = "layer that takes a LoRA adapter (Linear, Conv1d/2d/3d or MultiheadAttention)"


def _own_fields(base: type) -> tuple[str, ...]:
    """The layer arrays `lora` freezes (PEFT's `bias="none"`)."""
    if base is MultiheadAttention:
        return ("in_proj_weight", "in_proj_bias")
    return ("weight", "bias")


def _declared_shape(layer: Any, base: type) -> tuple[int, ...]:
    """The shape the layer's adapted weight has by its declared sizes, unstacked."""
    if base is MultiheadAttention:
        return (3 * layer.embed_dim, layer.embed_dim)
    if base is Linear:
        return (layer.out_features, layer.in_features)
    if base is eqx.nn.Linear:
        sizes = (layer.out_features, layer.in_features)
        return tuple(1 if s == "scalar" else s for s in sizes)
    # Convolutions, treenn's and Equinox's.
    return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)


def _stack_axes(path: str, layer: Any, base: type) -> tuple[int, ...]:
    """The leading axes of a layer stacked with `eqx.filter_vmap`: those of its weight
    before the shape its declared sizes give; `()` for a plain layer."""
    field = _own_fields(base)[0]
    shape = tuple(unmarked(state_of(layer)[field]).shape)
    declared = _declared_shape(layer, base)
    lead = len(shape) - len(declared)
    if lead < 0 or shape[lead:] != declared:
        raise ValueError(
            f"treenn.lora: {path!r} is a {base.__qualname__} whose {field} has shape "
            f"{shape}, which does not end in the shape its declared sizes give, {declared} "
            "(a layer stacked with eqx.filter_vmap has extra leading axes only), so no "
            "adapter shape fits it. Leave it out of the selection, or rebuild it with "
            "matching sizes"
        )
    return shape[:lead]


def _check_layer(path: str, layer: Any, base: type, dropout: float) -> None:
    if base is MultiheadAttention:
        if layer.in_proj_weight is None:
            raise ValueError(
                f"treenn.lora: {path!r} is an nn.MultiheadAttention with separate q/k/v "
                "projection weights (kdim or vdim differ from embed_dim); only the fused "
                "in_proj_weight takes an adapter (as in PEFT). Select its out_proj alone, or "
                "leave the layer out of the selection"
            )
        if dropout:
            raise ValueError(
                f"treenn.lora: dropout={dropout} on {path!r}, an nn.MultiheadAttention: its "
                "in-projection adapter is folded into in_proj_weight for the call (as PEFT "
                "does), which leaves no input to drop; use dropout=0.0 for this layer"
            )
    groups = getattr(layer, "groups", 1)
    if groups != 1:
        raise ValueError(
            f"treenn.lora: {path!r} is a grouped convolution (groups={groups}); a LoRA "
            "adapter on it could not be merged into its weight. Leave it out of the selection"
        )


def _adapter_dtype(weight_dtype: Any, dtype: Any = None) -> Any:
    """The adapters' dtype: `dtype` when given; else float32 for a floating base narrower
    than 32 bits (bfloat16, float16, float8: PEFT's `autocast_adapter_dtype=True`),
    else the base's own."""
    if dtype is not None:
        return jnp.dtype(dtype)
    weight_dtype = jnp.dtype(weight_dtype)
    if jnp.issubdtype(weight_dtype, jnp.floating) and weight_dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return weight_dtype


def adapter_edit(
    *,
    rank: int,
    scaling: float,
    dropout: float,
    inference: bool,
    dtype: Any,
    key: PRNGKeyArray,
) -> Callable[[str, Any], Any]:
    """`lora`'s per-layer edit: `edit(path, layer)` returns `layer` as its adapted class,
    its own arrays frozen and an adapter added, or raises naming `path` when the layer
    cannot take one. The n-th layer edited draws its `lora_A` from `fold_in(key, n)`.

    A layer stacked with `eqx.filter_vmap` (its weight has leading axes before the
    shape its sizes declare) gets adapters with the same leading axes: `lora_A`
    `(*stack, rank, in, *kernel)`, `lora_B` `(*stack, out, rank, 1, ...)`.
    """
    counter = itertools.count()

    def edit(path: str, layer: Any) -> Any:
        kind = base_class(type(layer))  # without marks and without remat
        if kind in BASE:
            raise ValueError(
                f"treenn.lora: {path!r} already has a LoRA adapter ({kind.__name__}); "
                "merge it first with treenn.merge_lora, or leave it out of the selection"
            )
        if kind not in ADAPTED:
            raise TypeError(
                f"treenn.lora: {path!r} is a {kind.__qualname__}, a subclass of a layer "
                "treenn adapts; its own __call__ could bypass the adapter, so it is not "
                "adapted. Leave it out of the selection"
            )
        _check_layer(path, layer, kind, dropout)
        stack = _stack_axes(path, layer, kind)
        drop = Dropout(dropout, inference=inference) if dropout else Identity()
        adapted = _adapt(
            layer,
            kind,
            stack=stack,
            rank=rank,
            scaling=scaling,
            dropout=drop,
            dtype=dtype,
            key=jax.random.fold_in(key, next(counter)),
        )
        return _keep_remat(adapted, layer)

    return edit


def _adapt(
    layer: Any,
    base: type,
    *,
    stack: tuple[int, ...],
    rank: int,
    scaling: float,
    dropout: Any,
    dtype: Any,
    key: PRNGKeyArray,
) -> Any:
    """`layer` as its adapted class: own arrays frozen, adapter added."""
    state = dict(state_of(layer))
    for name in _own_fields(base):
        value = state.get(name)
        # A mark (frozen already, or a quantized weight: QLoRA) is left as it is.
        if value is not None and is_array_like(value) and is_inexact(value.dtype):
            state[name] = Frozen(value)
    weight = unmarked(state[_own_fields(base)[0]])
    out, in_features, *spatial = _declared_shape(layer, base)  # kernel size, or none
    fan_in = in_features * math.prod(spatial)
    # iid draws, so each slice of a stacked layer draws as a layer of its own would.
    a_shape = (*stack, rank, in_features, *spatial)
    dtype = _adapter_dtype(weight.dtype, dtype)
    state["lora_A"] = torch_uniform(key, a_shape, fan_in, dtype)
    state["lora_B"] = jnp.zeros((*stack, out, rank, *(1,) * len(spatial)), dtype)
    state["lora_dropout"] = dropout
    state["scaling"] = scaling
    return build(ADAPTED[base], state)


def lora(
    model: T,
    where: Where,
    *,
    rank: int,
    alpha: float | int | None = None,
    dropout: float | int = 0.0,
    dtype: Any = None,
    key: PRNGKeyArray,
) -> T:
    """Add a low-rank adapter (LoRA) to every selected Linear, convolution and attention
    projection, treenn's and Equinox's, as Hugging Face PEFT's `LoraConfig(target_modules
    =...)` + `get_peft_model`.

    Each selected layer becomes its adapted subclass (`nn.Linear` -> `LoRALinear`, still an
    `nn.Linear`): its own weight and bias are frozen and keep their paths (PEFT's
    `bias="none"`), and it gains `lora_A` `(rank, in_features)` and `lora_B`
    `(out_features, rank)` (PEFT's layouts), adding `alpha / rank * lora_B @ lora_A @
    dropout(x)` to its output. Convolutions follow PEFT too: `lora_A` is a convolution
    with the layer's kernel size, stride, padding and dilation to `rank` channels, `(rank,
    in_channels, *kernel)`, and `lora_B` a 1x1 convolution `(out_channels, rank, 1, 1)`.
    `lora_B` starts at zero, so the model's outputs are unchanged until it trains;
    `lora_A` is initialised as PEFT's (Kaiming-uniform, `U(±1/sqrt(fan_in))`).

    Attention: timm-style `nn.Attention` has Linear layers `qkv` (fused, one adapter, as
    PEFT) and `proj`; `nn.MultiheadAttention` gets one adapter on its fused
    `in_proj_weight` (at `<path>.lora_A`, `lora_B` of shape `(3 * embed_dim, rank)`)
    and `out_proj` its own; Equinox's `MultiheadAttention` is four `eqx.nn.Linear`s,
    each adapted.

    Stacked layers: a layer built with `eqx.filter_vmap` (a stack of blocks run with
    `lax.scan` or `eqx.filter_vmap`, weight `(n, out, in)`) gets adapters with the same
    leading axes, `lora_A` `(n, rank, in)` and `lora_B` `(n, out, rank)`: each slice is
    an adapted layer, and `merge_lora` merges slice by slice.

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `where`: which layers (see selectors): `"**.attn.qkv"`, `nn.Linear`, a getter...
        Every adaptable layer whose path the selection covers is adapted, so selecting
        a block adapts all its layers; `None` adapts every one.
    - `rank`: the adapters' rank `r` (>= 1).
    - `alpha`: LoRA's `alpha`; the scaling is `alpha / rank`. `None` means `rank`
        (scaling 1).
    - `dropout`: dropout on the adapter's input (PEFT's `lora_dropout`). `0.0` puts an
        `nn.Identity` at `<path>.lora_dropout`, as PEFT does; otherwise an unpinned
        `nn.Dropout`, a mode-bearing module like any other: `nn.eval_mode` and
        `nn.train_mode` switch it with the rest of the model, `treenn.train_step` and
        `eval_step` run it in the step's mode, and it can be pinned. It starts in the
        mode of the model's unpinned mode-bearing modules, the ones the steps switch, so
        the steps accept the adapted model whenever they accepted the model. When they
        are in mixed modes (which the steps refuse) it starts in training mode; when
        every mode-bearing module is pinned, in evaluation mode if all of them are in
        it, else in training mode, as when the model has none (`nn.Dropout`'s default).
        In training mode the adapted layer needs `key=`, and raises naming
        `lora_dropout` without one; treenn's `Attention`, `MLP` and
        `MultiheadAttention` hand each projection a key of its own.
    - `dtype`: the adapters' dtype. `None` means float32 on a floating base narrower
        than 32 bits (bfloat16, float16: PEFT's default `autocast_adapter_dtype=True`,
        for stable training), else the base weight's dtype. The adapter computes in its
        dtype and the layer returns the base layer's output dtype.
    - `key`: PRNG key for `lora_A`.

    **Returns:** the adapted model; `model` is unchanged. The adapters are trainable;
    everything outside the selected layers keeps its status (freeze the rest with
    `treenn.freeze` as usual: `lora` after `freeze` leaves only the adapters
    trainable). Raises `ValueError` naming the selector when it selects no adaptable
    layer, or naming the path of an already adapted layer, a grouped convolution, an
    `nn.MultiheadAttention` with separate q/k/v weights, or a layer whose weight's
    shape its declared sizes do not explain; `TypeError` for a selected subclass of a
    supported layer (its own `__call__` could ignore the adapter).

    !!! Example

        ```python
        model = treenn.freeze(model)
        model = treenn.lora(model, "blocks.*.attn.*", rank=8, alpha=16, key=key)
        model = treenn.unfreeze(model, "head")       # a new head trains fully
        opt_state = tx.init(treenn.trainable(model)) # adapters and head only
        ```
    """
    check_model(model, "treenn.lora")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"treenn.lora: rank={rank!r} must be an int >= 1")
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0
    ):
        raise ValueError(f"treenn.lora: alpha={alpha!r} must be a positive number (or None)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"treenn.lora: dropout={dropout!r} must be in [0, 1)")
    if dtype is not None and not _is_float_dtype(dtype):
        raise ValueError(f"treenn.lora: dtype={dtype!r} must be a floating dtype (or None)")
    if not _is_prng_key(key):
        raise TypeError(f"treenn.lora: key={key!r} is not a PRNG key; pass e.g. jax.random.key(0)")
    surgery = _Adapt(
        adapter_edit(
            rank=rank,
            scaling=float(rank if alpha is None else alpha) / rank,
            dropout=float(dropout),
            inference=_adapter_mode(model) if dropout else False,
            dtype=dtype,
            key=key,
        )
    )
    out = edit(model, where, surgery)
    if not surgery.adapted:
        if where is None:
            raise ValueError(f"treenn.lora: the model has no {_KINDS}")
        candidates = [dotted(p) for p, m, _ in modules(model) if m is not None and _STOP_LAYER(m)]
        raise no_match(where, _KINDS, candidates)
    return out


class _Adapt(Edit):
    """`lora`'s surgery: every covered adaptable layer through `adapter_edit`."""

    needs_paths = True  # its errors name the layer

    @staticmethod
    def target_type(kind: type) -> bool:
        return issubclass(kind, _ADAPTABLE)

    def __init__(self, edit: Callable[[str, Any], Any]) -> None:
        self.edit = edit
        self.adapted = 0

    def module(self, path: Any, layer: Any) -> Any:
        self.adapted += 1
        return self.edit(dotted(path), layer)


class _Merge(Edit):
    """`merge_lora`'s surgery: every adapter folded into its layer's weight."""

    @staticmethod
    def target_type(kind: type) -> bool:
        return issubclass(kind, _Adapter)

    def __init__(self) -> None:
        self.merged = 0

    def module(self, path: Any, layer: Any) -> Any:
        self.merged += 1
        base = BASE[base_class(type(layer))]
        field = layer._merged_field
        stored = state_of(layer)[field]
        if type(stored) is Quantized:  # QLoRA: merged into the dequantized weight, frozen
            stored = Frozen(getattr(layer, field))
        value = _merged(unmarked(stored), layer._delta_weight())
        return _keep_remat(_view(base, layer, **{field: marked_like(stored, value)}), layer)


def _keep_remat(new: Any, old: Any) -> Any:
    """`new` (adapted or merged from `old`) rematerialised as `old` was (`treenn.remat`)."""
    policy = policy_of(old)
    if policy is False:
        return new
    return build(remat_class(base_class(type(new)), policy), dict(state_of(new)))


def _is_prng_key(key: Any) -> bool:
    dtype = getattr(key, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == jnp.uint32 and tuple(key.shape) == (2,)


def _is_float_dtype(dtype: Any) -> bool:
    try:
        return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
    except TypeError:
        return False


def _adapter_mode(model: Any) -> bool:
    """The mode (`inference`) new adapter dropouts start in: that of the unpinned
    mode-bearing modules, which `train_step`/`eval_step` require to agree; the pinned
    ones keep theirs and take no part (see `lora`'s `dropout`)."""
    from .nn import modes, pinned

    found, pins = modes(model), pinned(model)
    free = {inference for path, inference in found.items() if not pins[path]}
    if len(free) == 1:
        return free.pop() is True  # an unknown mode (`jax.eval_shape`): training
    if free:  # mixed: the steps refuse the model anyway
        return False
    return bool(found) and all(found.values())


def merge_lora(model: T) -> T:
    """Fold every LoRA adapter into its layer's weight, as PEFT's `merge_and_unload`.

    **Arguments:**

    - `model`: a model adapted by `treenn.lora`.

    **Returns:** a plain model: each adapted layer is again its original class (an
    `nn.Linear`, an `eqx.nn.Conv2d`...), with `weight + alpha / rank * lora_B @
    lora_A` as its weight, which keeps the base weight's status (frozen, since
    `lora`) and dtype (the sum is computed in float32, or float64 for float64
    arrays); a stacked layer (see `lora`) merges slice by slice. The adapters and
    their dropout are gone. Its outputs equal the adapted model's to float32 rounding
    (to the base's rounding on a bfloat16 base), at the base model's cost. Raises
    `ValueError` when the model has no adapter.

    !!! Example

        ```python
        served = treenn.merge_lora(model)
        treenn.save("served.eqx", served)
        ```
    """
    check_model(model, "treenn.merge_lora")
    surgery = _Merge()
    out = edit(model, None, surgery)
    if not surgery.merged:
        raise ValueError("treenn.merge_lora: the model has no LoRA adapter (see treenn.lora)")
    return out
