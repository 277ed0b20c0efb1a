"""`treenn.quantize` and `treenn.dequantize`: Linear and Embedding weights stored in 4 or
8 bits (QLoRA's storage), frozen by nature, dequantized on the fly.

A quantized weight is stored in the layer's own field inside a `Quantized` mark (see
`_status`) around a `QuantizedWeight`: a module of integer arrays (the packed codes and
the scales) with the weight's shape, dtype and format as static fields. Reading the
field (`layer.weight`, in the layer's own `__call__`) returns the dequantized array in
the weight's dtype, its gradient stopped, so no layer changes and no layer subclass is
needed. Every packed array is an unsigned integer array, floats included (stored as
their bits): nothing can train it, `treenn.unfreeze` included, and `save`/`load` keep
it bit for bit.

The formats are bitsandbytes' (`bitsandbytes.functional.quantize_4bit`, QLoRA):

- NF4: the weight flattened in row-major order, in blocks of `block_size`; each block
  scaled by its absmax (`x * (1 / absmax)`, the last partial block divided) and each
  value mapped to the nearest of the 16 NormalFloat levels (ties to the lower level, as
  `torch.bucketize` on the levels' midpoints); two codes a byte, the first in the high
  nibble, an odd count padded with the code of 0.
- double quantization (`compress_statistics=True`): the absmaxes minus their mean
  (`offset`) quantized to 8 bits with bitsandbytes' dynamic map, in blocks of 256, with
  bitsandbytes' CPU kernel's index (a 65,536-entry table over [-1, 1]).
- int8: each block scaled by its absmax and rounded to 127 levels a side.

Dequantization is `level * absmax` in float32, rounded once to the weight's dtype.
"""

from __future__ import annotations

from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._edit import Edit, edit
from ._module import Module, build, replace
from ._selectors import Where, no_match
from ._status import Frozen, Quantized, is_abstract_array, is_inexact, unmarked
from ._tree import by_type, check_model, dotted, modules, state_of
from .models._gpt2 import Conv1D
from .nn._embedding import Embedding
from .nn._linear import Linear

T = TypeVar("T")

# bitsandbytes' NF4 levels (`get_4bit_type("nf4")`): quantiles of N(0, 1), QLoRA §3.
_NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_NF4_BOUNDS = (_NF4[:-1] + _NF4[1:]) / np.float32(2)
_NF4_ZERO = 7  # the code of 0.0: pads an odd count, as bitsandbytes pads with 0.0


def _linspace(n: int) -> np.ndarray:
    """`torch.linspace(0.1, 1, n, dtype=torch.float32)` bit for bit: torch steps from
    the start for the first half and from the end for the second, each in one rounding
    (a fused multiply-add, exact in float64 for float32 operands)."""
    step = np.float64((np.float32(1) - np.float32(0.1)) / np.float32(n - 1))
    i = np.arange(n)
    low = (np.float64(np.float32(0.1)) + step * i).astype(np.float32)
    high = (1.0 - step * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, low, high)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted levels in [-1, 1]."""
    data: list[float] = []
    for i in range(7):
        edges = _linspace(2**i + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.array(sorted(data), np.float32)


_DYNAMIC = _dynamic_map()
# bitsandbytes' CPU kernel picks a dynamic level through a table over 65,536 points of
# [-1, 1] (the first level whose upper midpoint is not below the point).
_LUT_SIZE = 65536
_DYNAMIC_LUT = np.searchsorted(
    (_DYNAMIC[:-1] + _DYNAMIC[1:]) * np.float32(0.5),
    np.float32(-1) + np.float32(2) * np.arange(_LUT_SIZE, dtype=np.float32) / np.float32(65535),
    side="left",
).astype(np.uint8)
_NESTED_BLOCK = 256  # bitsandbytes' block size for the scales' quantization

KINDS = ("nf4", "int8")


def _blocks(flat: jax.Array, block: int, divide_last: bool) -> tuple[jax.Array, jax.Array]:
    """`flat` (float32) in blocks scaled to [-1, 1] by their absmax, as bitsandbytes:
    `(scaled (n,), absmax (blocks,))`. Its 4-bit op divides the last partial block
    (`divide_last`); its CPU kernel for 8 bits multiplies every block by the inverse."""
    n = flat.shape[0]
    count = -(-n // block)
    padded = jnp.pad(flat, (0, count * block - n)).reshape(count, block)
    absmax = jnp.max(jnp.abs(padded), axis=1)
    safe = jnp.maximum(absmax, np.float32(1e-38))
    scaled = padded * (np.float32(1) / safe)[:, None]
    if divide_last and n % block:
        scaled = scaled.at[-1].set(padded[-1] / safe[-1])
    return jnp.clip(scaled, -1, 1).reshape(-1)[:n], absmax


def _blockwise(values: jax.Array, scales: jax.Array, block: int) -> jax.Array:
    """`values[i] * scales[i // block]`, in float32."""
    n = values.shape[0]
    count = scales.shape[0]
    padded = jnp.pad(values, (0, count * block - n)).reshape(count, block)
    return (padded * scales[:, None]).reshape(-1)[:n]


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def _float(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _nested(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bitsandbytes' double quantization of the absmaxes: `(codes uint8, absmax of
    their blocks, offset)`."""
    offset = jnp.mean(absmax)
    return (*_nested_with(absmax, offset), offset)


def _nested_with(absmax: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    scaled, nested_absmax = _blocks(absmax - offset, _NESTED_BLOCK, divide_last=False)
    index = (
        (scaled + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5)
    ).astype(jnp.uint16)
    codes = jnp.asarray(_DYNAMIC_LUT)[index]
    # bitsandbytes' kernel writes code 0 for a block of zeros.
    zero = jnp.repeat(nested_absmax == 0, _NESTED_BLOCK)[: absmax.shape[0]]
    return jnp.where(zero, jnp.uint8(0), codes), nested_absmax


def _pack(
    weight: jax.Array, kind: str, block: int, double_quant: bool
) -> dict[str, jax.Array | None]:
    flat = weight.reshape(-1).astype(jnp.float32)
    scaled, absmax = _blocks(flat, block, divide_last=True)
    if kind == "nf4":
        codes = jnp.searchsorted(jnp.asarray(_NF4_BOUNDS), scaled, side="left").astype(jnp.uint8)
        if codes.shape[0] % 2:
            codes = jnp.pad(codes, (0, 1), constant_values=_NF4_ZERO)
        codes = (codes[0::2] << 4) | codes[1::2]
    else:
        codes = jnp.round(scaled * np.float32(127)).astype(jnp.int8)
    out: dict[str, jax.Array | None] = {"codes": codes}
    if double_quant:
        nested, nested_absmax, offset = _nested(absmax)
        out.update(absmax=nested, nested_absmax=_bits(nested_absmax), offset=_bits(offset[None]))
    else:
        out.update(absmax=_bits(absmax), nested_absmax=None, offset=None)
    return out


_pack_jit = jax.jit(_pack, static_argnums=(1, 2, 3))


class QuantizedWeight(Module):
    """The packed storage of a weight quantized by `treenn.quantize` (what its layer's
    field holds, inside a mark that reads as the dequantized weight).

    Arrays, all unsigned integers: `codes` (NF4: two 4-bit codes a byte, `uint8`;
    int8: `int8`), `absmax` (one scale per block: float32 bits as `uint32`, or `uint8`
    codes when double-quantized), `nested_absmax` and `offset` (float32 bits of the
    scales' own scales and mean; `None` without double quantization). Static: the
    weight's `shape` and `dtype`, `kind` (`"nf4"`, `"int8"`) and `block_size`.
    """

    codes: Any
    absmax: Any
    nested_absmax: Any
    offset: Any
    shape: tuple[int, ...] = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    kind: str = eqx.field(static=True)
    block_size: int = eqx.field(static=True)

    def scales(self) -> jax.Array:
        """The blocks' absmaxes, float32 (double quantization undone)."""
        if self.nested_absmax is None:
            return _float(self.absmax)
        levels = jnp.asarray(_DYNAMIC)[self.absmax]
        scales = _blockwise(levels, _float(self.nested_absmax), _NESTED_BLOCK)
        return scales + _float(self.offset)[0]

    def dequantized(self) -> jax.Array:
        """The weight, `level * absmax` in float32 rounded to its dtype."""
        n = int(np.prod(self.shape, dtype=np.int64))
        if self.kind == "nf4":
            codes = jnp.stack([self.codes >> 4, self.codes & 15], axis=1).reshape(-1)[:n]
            levels = jnp.asarray(_NF4)[codes]
        else:
            levels = self.codes.astype(jnp.float32) / np.float32(127)
        values = _blockwise(levels, self.scales(), self.block_size)
        return values.astype(self.dtype).reshape(self.shape)


def pack(weight: Any, kind: str, block_size: int, double_quant: bool) -> QuantizedWeight:
    """`weight` (an array, concrete or abstract) as its packed storage."""
    if is_abstract_array(weight):
        arrays = jax.eval_shape(lambda w: _pack(w, kind, block_size, double_quant), weight)
    else:
        arrays = _pack_jit(weight, kind, block_size, double_quant)
    return build(
        QuantizedWeight,
        {
            **arrays,
            "shape": tuple(weight.shape),
            "dtype": jnp.dtype(weight.dtype),
            "kind": kind,
            "block_size": block_size,
        },
    )


def _dequantized(storage: QuantizedWeight) -> Any:
    """The float weight of `storage` (abstract for an abstract one)."""
    if is_abstract_array(storage.codes):
        return jax.ShapeDtypeStruct(storage.shape, storage.dtype)
    return storage.dequantized()


# The layers whose `weight` can be stored quantized: read only through attribute
# access, as one array (treenn's and Equinox's Linear and Embedding, GPT-2's Conv1D).
TARGETS: tuple[type, ...] = (Linear, Embedding, Conv1D, eqx.nn.Linear, eqx.nn.Embedding)
_KINDS = "Linear or Embedding layer (treenn's, Equinox's, GPT-2's Conv1D)"
_STOP_TARGET = by_type(lambda kind: issubclass(kind, TARGETS))


class _Quantize(Edit):
    needs_paths = True  # errors name the layer

    @staticmethod
    def target_type(kind: type) -> bool:
        return issubclass(kind, TARGETS)

    def __init__(self, kind: str, block_size: int, double_quant: bool) -> None:
        self.kind, self.block_size, self.double_quant = kind, block_size, double_quant
        self.selected = 0

    def module(self, path: Any, layer: Any) -> Any:
        self.selected += 1
        stored = state_of(layer)["weight"]
        if type(stored) is Quantized:
            return layer  # already stored quantized: left as it is
        weight = unmarked(stored)
        if not is_inexact(weight.dtype):
            raise TypeError(
                f"treenn.quantize: {dotted(path)}.weight is {weight.dtype}, not a "
                "floating-point array; only float weights are quantized"
            )
        storage = pack(weight, self.kind, self.block_size, self.double_quant)
        return replace(layer, weight=Quantized(storage))


class _Dequantize(Edit):
    @staticmethod
    def target_type(kind: type) -> bool:
        return issubclass(kind, TARGETS)

    def __init__(self) -> None:
        self.done = 0

    def module(self, path: Any, layer: Any) -> Any:
        stored = state_of(layer)["weight"]
        if type(stored) is not Quantized:
            return layer
        self.done += 1
        return replace(layer, weight=Frozen(_dequantized(stored.value)))


def quantize(
    model: T,
    where: Where,
    *,
    dtype: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
) -> T:
    """Store the selected Linear and Embedding weights quantized and frozen: QLoRA's
    4-bit NormalFloat (bitsandbytes' `Linear4bit`), or int8.

    Each selected layer keeps its class, path and call; its `weight` field holds the
    packed storage, and reading `layer.weight` (as the layer's own `__call__` does)
    returns the weight dequantized in its dtype, so the layer computes in the dtype it
    had, with the weight's gradient stopped. Biases are left as they are. The packed
    arrays appear under `<layer>.weight.codes`, `.absmax`, `.nested_absmax` and
    `.offset` (statuses `"static"`: unsigned integer arrays, floats stored as their
    bits, which nothing trains, `treenn.unfreeze` included); `treenn.summary` shows
    their bytes, `save`/`load` keep them bit for bit, `treenn.jit` and `shard` treat
    them as arrays.

    `"nf4"` equals bitsandbytes' `quantize_4bit(w, blocksize=block_size,
    quant_type="nf4", compress_statistics=double_quant)`: the same codes and scales, and
    the same dequantized values (`dequantize_4bit`). With double quantization
    bitsandbytes' `offset` is torch's float32 mean of the absmaxes and treenn's
    XLA's, which can differ in the last bit.

    QLoRA: `treenn.lora` adapts quantized layers (the adapters train in float, the
    packed base stays frozen); `treenn.merge_lora` folds the adapters into the
    dequantized weight, giving a float weight (frozen).

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `where`: which layers (see selectors), as for `treenn.lora`: `"**.mlp.*"`,
        `nn.Linear`, a getter... Every Linear (`nn.Linear`, `eqx.nn.Linear`, GPT-2's
        `Conv1D`) and Embedding (`nn.Embedding`, `eqx.nn.Embedding`) the selection
        covers is quantized; `None` quantizes every one.
    - `dtype`: `"nf4"` (4 bits a weight) or `"int8"` (8 bits, absmax per block).
    - `block_size`: weights per absmax scale (an int >= 2; bitsandbytes' 64).
    - `double_quant`: quantize the scales too (QLoRA's double quantization, 8 bits
        per scale in blocks of 256), about 4.13 bits a weight for NF4 instead of 4.5.

    **Returns:** the model with those weights quantized; `model` is unchanged. Weights
    already quantized are left as they are. Raises `ValueError` naming the selector
    when it selects no Linear or Embedding, or for a bad `dtype` or `block_size`.

    !!! Example

        ```python
        model = treenn.quantize(treenn.freeze(model), nn.Linear)  # NF4
        model = treenn.lora(model, nn.Linear, rank=8, key=key)     # QLoRA
        ```
    """
    check_model(model, "treenn.quantize")
    if dtype not in KINDS:
        raise ValueError(f"treenn.quantize: dtype={dtype!r} must be one of {KINDS}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(
            f"treenn.quantize: block_size={block_size!r} must be an int >= 2 (weights "
            "per scale; bitsandbytes uses 64)"
        )
    if not isinstance(double_quant, bool):
        raise TypeError(f"treenn.quantize: double_quant={double_quant!r} must be a bool")
    surgery = _Quantize(dtype, block_size, double_quant)
    out = edit(model, where, surgery)
    if not surgery.selected:
        if where is None:
            raise ValueError(f"treenn.quantize: the model has no {_KINDS}")
        candidates = [dotted(p) for p, m, _ in modules(model) if m is not None and _STOP_TARGET(m)]
        raise no_match(where, _KINDS, candidates)
    return out


def dequantize(model: T, where: Where = None) -> T:
    """Store quantized weights as float arrays again: each becomes exactly the values
    the quantized layer computed with, in its dtype, frozen.

    **Arguments:**

    - `model`: a model quantized by `treenn.quantize`.
    - `where`: which layers (see selectors); `None`: every quantized one.

    **Returns:** the model with those weights dequantized (frozen: `treenn.unfreeze`
    makes them trainable). Raises `ValueError` when the selection holds no quantized
    weight.

    !!! Example

        ```python
        model = treenn.dequantize(model)  # float weights, e.g. for treenn.save_hf
        ```
    """
    check_model(model, "treenn.dequantize")
    surgery = _Dequantize()
    out = edit(model, where, surgery)
    if not surgery.done:
        if where is None:
            raise ValueError("treenn.dequantize: the model has no quantized weight")
        raise ValueError(
            f"treenn.dequantize: where={where!r} selects no quantized weight (see treenn.quantize)"
        )
    return out
