"""Loading PyTorch and timm checkpoints into treenn models: `treenn.load_torch`.

treenn's layers store PyTorch's layouts under PyTorch's names (`Conv2d.weight` is
`(out, in / groups, kh, kw)`, `Linear.weight` is `(out, in)`, `MultiheadAttention` has
`in_proj_weight`, timm's `Attention` a fused `qkv`), and the zoo's paths are torchvision's
and timm's, so a state dict mostly maps by name, array for array. What does not:

- `num_batches_tracked`: PyTorch's BatchNorm always saves it, treenn's keeps it only
  with `momentum=None`; ignored where the model has that BatchNorm without it, and
  unexpected (as in PyTorch) where the model has no such BatchNorm at all.
- attention projections stored split where the model fuses them (timm's BEiT `q_bias`
  and `v_bias`, EVA's `q_proj`/`k_proj`/`v_proj`, into `qkv`), or fused where the model
  splits them (PyTorch's `in_proj_weight` into Equinox's `MultiheadAttention`
  `query_proj`/`key_proj`/`value_proj`, and its `out_proj` into `output_proj`);
- Equinox layers' own shapes: a convolution bias is `(out, 1, 1)` there, `(out,)` in
  PyTorch, and is reshaped. No other shape is: an `(8, 1)` weight does not load into an
  `(1, 8)` one (inputs and outputs swapped), as in PyTorch.

Arrays are cast to the model's dtype within a kind (floating to floating, integer to
integer), as PyTorch's `load_state_dict` copies them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, overload

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ._fill import (
    LoadReport,
    array_slots,
    check_filled,
    describe,
    fill,
    layout,
    settle_modes,
)
from ._safetensors import CheckpointError, read_safetensors
from ._tree import check_model, flatten, unflatten

T = TypeVar("T")
Source = Mapping[str, Any] | str | os.PathLike[str]

_TORCH_FILES = (".pt", ".pth", ".bin")

# A fused projection and the three (q, k, v) it concatenates along its first axis.
_FUSED = (
    ("qkv.weight", ("q.weight", "k.weight", "v.weight")),
    ("qkv.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight")),
    ("qkv.bias", ("q.bias", "k.bias", "v.bias")),
    ("qkv.bias", ("q_proj.bias", "k_proj.bias", "v_proj.bias")),
    ("qkv.bias", ("q_bias", "k_bias", "v_bias")),
    ("in_proj_weight", ("q_proj_weight", "k_proj_weight", "v_proj_weight")),
    ("in_proj_weight", ("query_proj.weight", "key_proj.weight", "value_proj.weight")),
    ("in_proj_bias", ("query_proj.bias", "key_proj.bias", "value_proj.bias")),
)
# Model suffix <- state-dict suffix: Equinox's MultiheadAttention names.
_RENAMES = (
    ("output_proj.weight", "out_proj.weight"),
    ("output_proj.bias", "out_proj.bias"),
)
_IGNORED = "num_batches_tracked"


# -- reading ------------------------------------------------------------------------------


def _read(source: Any) -> tuple[dict[str, np.ndarray], str]:
    """The state dict's arrays as NumPy arrays, and how to name the source in errors."""
    if isinstance(source, Mapping):
        return _arrays(source, "the state dict"), "the state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "load_torch: expected a state dict (a mapping of names to tensors or arrays) or "
            f"the path of a .pt, .pth or .safetensors file, got a {type(source).__name__}"
        )
    name = os.fspath(source)
    label = repr(name)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"load_torch: no file at {label}")
    ext = os.path.splitext(name)[1].lower()
    if ext == ".safetensors":
        return read_safetensors(name)[0], label
    if ext in _TORCH_FILES:
        return _arrays(_torch_load(name), label), label
    raise CheckpointError(
        f"load_torch: cannot tell the format of {label} from its extension {ext or '(none)'!r}; "
        f"expected {', '.join(_TORCH_FILES)} (PyTorch) or .safetensors"
    )


def _torch_load(name: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"load_torch: reading {name!r} (a PyTorch pickle) needs torch: pip install "
            "'treenn[torch]'. Safetensors files need no torch."
        ) from err
    try:
        content = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds (UnpicklingError, RuntimeError...)
        raise CheckpointError(
            f"load_torch: torch.load({name!r}, weights_only=True) failed (a whole pickled "
            f"model rather than its state_dict()? a corrupt file?): {err}"
        ) from err
    if not isinstance(content, Mapping):
        raise CheckpointError(
            f"load_torch: {name!r} holds a {type(content).__name__}, not a state dict; "
            "save model.state_dict()"
        )
    return content


def _arrays(state: Mapping[Any, Any], label: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    bad = []
    for key, value in state.items():
        array = _to_numpy(key, value)
        if not isinstance(key, str) or array is None:
            bad.append(f"{key!r} ({type(value).__name__})")
        else:
            out[key] = array
    if bad:
        nested = [k for k, v in state.items() if isinstance(v, Mapping)]
        hint = f"; a training checkpoint? pass its {nested[0]!r} entry" if nested else ""
        raise CheckpointError(
            f"load_torch: {label} is not a state dict of arrays: {', '.join(bad)}{hint}"
        )
    return out


def _to_numpy(key: Any, value: Any) -> np.ndarray | None:
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value)
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return _from_torch(key, value)
    return None


def _from_torch(key: Any, tensor: Any) -> np.ndarray:
    # torch is imported already: the tensor exists. NumPy has no bfloat16 or float8, so
    # those travel as their bits.
    torch = sys.modules["torch"]
    bits = {
        getattr(torch, "bfloat16", None): (torch.int16, ml_dtypes.bfloat16),
        getattr(torch, "float8_e4m3fn", None): (torch.uint8, ml_dtypes.float8_e4m3fn),
        getattr(torch, "float8_e5m2", None): (torch.uint8, ml_dtypes.float8_e5m2),
    }
    tensor = tensor.detach().cpu()
    try:
        if tensor.dtype in bits:
            carrier, dtype = bits[tensor.dtype]
            return np.asarray(tensor.contiguous().view(carrier).numpy().view(dtype))
        return np.asarray(tensor.numpy())
    except (TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"load_torch: cannot convert {key!r} ({tensor.dtype}, {tensor.layout}) to an "
            f"array: {err}"
        ) from err


# -- matching -----------------------------------------------------------------------------


def _prefix(name: str, suffix: str) -> str | None:
    """`name` without `suffix`, when it ends with it on a path-component boundary."""
    if name == suffix:
        return ""
    if name.endswith("." + suffix):
        return name[: -len(suffix)]
    return None


class _Matcher:
    """Finds each model path's array in the state dict, recording what it used."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.used: set[str] = set()
        self.chunks: dict[str, set[int]] = {}

    def find(self, name: str) -> tuple[np.ndarray, list[str]] | None:
        if name in self.arrays:
            return self.arrays[name], [name]
        for model_suffix, file_suffix in _RENAMES:
            prefix = _prefix(name, model_suffix)
            if prefix is not None and prefix + file_suffix in self.arrays:
                return self.arrays[prefix + file_suffix], [prefix + file_suffix]
        return self._merged(name) or self._split(name)

    def _merged(self, name: str) -> tuple[np.ndarray, list[str]] | None:
        for fused, parts in _FUSED:
            prefix = _prefix(name, fused)
            if prefix is None:
                continue
            keys = [prefix + p for p in parts]
            q, k, v = (self.arrays.get(key) for key in keys)
            if q is None or v is None or (k is None and not fused.endswith("bias")):
                continue
            if k is None:  # BEiT and EVA fix the key bias at zero and do not save it
                k = np.zeros_like(q)
                keys.pop(1)
            if q.shape[1:] == k.shape[1:] == v.shape[1:] and q.dtype == k.dtype == v.dtype:
                return np.concatenate([q, k, v]), keys
        return None

    def _split(self, name: str) -> tuple[np.ndarray, list[str]] | None:
        for fused, parts in _FUSED:
            for i, part in enumerate(parts):
                prefix = _prefix(name, part)
                if prefix is None or prefix + fused not in self.arrays:
                    continue
                whole = self.arrays[prefix + fused]
                if whole.ndim and whole.shape[0] % 3 == 0:
                    self.chunks.setdefault(prefix + fused, set()).add(i)
                    return np.split(whole, 3)[i], [prefix + fused + f"[{'qkv'[i]}]"]
        return None

    def unused(self) -> list[str]:
        """State-dict keys no model array took (a fused array counts as taken when every
        third of it was, or the rest is zero: a key bias split into a bias-free layer)."""
        done = set(self.used)
        for key, taken in self.chunks.items():
            rest = [c for i, c in enumerate(np.split(self.arrays[key], 3)) if i not in taken]
            if all(not np.any(c) for c in rest):
                done.add(key)
        return sorted(k for k in self.arrays if k not in done and not self._tracked(k))

    def _tracked(self, key: str) -> bool:
        """A BatchNorm's `num_batches_tracked` the model's BatchNorm does without: its
        running statistics were used. Without them it is unexpected, as in PyTorch."""
        prefix = _prefix(key, _IGNORED)
        return prefix is not None and prefix + "running_mean" in self.used


def _fit(value: np.ndarray, like: Any, name: str) -> np.ndarray | None:
    """`value` in `like`'s shape and dtype, or None when it cannot be."""
    shape, dtype, impl = layout(like)
    if impl is not None:
        return None  # a PRNG key has no PyTorch counterpart
    if tuple(value.shape) != shape:
        if not _is_conv_bias(value.shape, shape, name):
            return None
        value = value.reshape(shape)
    if value.dtype != dtype:
        kinds = (jnp.floating, jnp.integer, jnp.complexfloating, jnp.bool_)
        if not any(jnp.issubdtype(value.dtype, k) and jnp.issubdtype(dtype, k) for k in kinds):
            return None
        value = value.astype(dtype)
    return value


def _is_conv_bias(got: tuple[int, ...], want: tuple[int, ...], name: str) -> bool:
    """The one known layout difference across size-1 axes: an Equinox convolution's
    `(out, 1, ..., 1)` bias for PyTorch's `(out,)`."""
    return (
        name.rsplit(".", 1)[-1] == "bias"
        and len(got) == 1
        and len(want) >= 2
        and want[0] == got[0]
        and all(s == 1 for s in want[1:])
    )


_ORDER = (
    "treenn.load_torch takes the file first, as every loader does: "
    "load_torch(path_or_state_dict, like) (the order changed from load_torch(model, path))"
)


def _check_order(path: Any, like: Any) -> None:
    """A clear error for the old argument order, `load_torch(model, path_or_state)`."""
    try:
        check_model(like, "treenn.load_torch", "like")
    except TypeError as err:
        if isinstance(like, (str, bytes, os.PathLike)):
            raise TypeError(f"{err}. {_ORDER}") from None
        raise
    if not isinstance(path, (Mapping, str, os.PathLike)) and isinstance(like, Mapping):
        raise TypeError(
            f"treenn.load_torch: path is a {type(path).__name__}, not a file or a state "
            f"dict, and like is a {type(like).__name__}: arguments swapped? {_ORDER}"
        )


# -- the public function ------------------------------------------------------------------


@overload
def load_torch(
    path: Source,
    like: T,
    *,
    strict: bool = True,
    report: Literal[False] = False,
) -> T: ...


@overload
def load_torch(
    path: Source,
    like: T,
    *,
    strict: bool = True,
    report: Literal[True],
) -> tuple[T, LoadReport]: ...


def load_torch(
    path: Any,  # a `Source`; `Any` so that the old argument order gets the error below
    like: T,
    *,
    strict: bool = True,
    report: bool = False,
) -> T | tuple[T, LoadReport]:
    """Load a PyTorch state dict (torchvision, timm, your own `nn.Module`'s) into a
    treenn or Equinox model whose paths follow the PyTorch module's names.

    **Arguments:**

    - `path`: the file, first as in every loader: a `.pt`/`.pth`/`.bin` file (read
        with `torch.load(weights_only=True)`: needs torch) or a `.safetensors` file
        (needs no torch); or a state dict itself (a mapping of names to torch tensors,
        NumPy or JAX arrays).
    - `like`: the model to fill, e.g. `treenn.models.resnet50(1000, key=key)`. Its
        frozen status, buffers, modes and pins are kept; only array values change. It
        may be abstract, built by `jax.eval_shape` to skip initialising what the file
        replaces; then every array must be filled.
    - `strict`: every model array must be filled and every state-dict entry used, with
        a fitting shape; otherwise one `CheckpointError` lists every missing,
        unexpected and mis-shaped key. With `strict=False`, what fits is loaded and the
        rest of the model is kept as it was (a new head, say); an error only when
        nothing fits at all.
    - `report`: also return a `LoadReport` (`loaded`, `missing`, `unexpected`, and
        `skipped` for mis-shaped keys kept as initialised).

    Layouts are converted where the model's differ from PyTorch's (see the module
    notes): BatchNorm's `num_batches_tracked` is ignored where the model has none, fused
    and split attention projections are split or merged, arrays are cast to the model's
    dtype.

    **Returns:** the loaded model, or `(model, report)` with `report=True`. Raises a
    `TypeError` saying so when the arguments come in the order of treenn 0.x
    (`load_torch(model, path)`).

    !!! Example

        ```python
        # state = torchvision.models.resnet50(weights="DEFAULT").state_dict()
        model = treenn.load_torch(state, treenn.models.resnet50(1000, key=key))
        model = treenn.load_torch("resnet50.safetensors", model)

        # no initialisation: an abstract model, filled from the file
        vit = jax.eval_shape(lambda k: treenn.models.vit_small(1000, key=k), key)
        vit = treenn.load_torch("vit_small.pth", vit)

        # a new 10-class head: keep it as initialised
        model, rep = treenn.load_torch(state, resnet50(10, key=key), strict=False, report=True)
        rep.skipped   # ['fc.weight', 'fc.bias']
        ```
    """
    _check_order(path, like)
    arrays, label = _read(path)
    matcher = _Matcher(arrays)
    done = _Outcome()
    paths, leaves, treedef = flatten(like)
    names = array_slots(like, paths, leaves)
    new = [
        leaf if name is None else done.fill(name, leaf, matcher)
        for name, leaf in zip(names, leaves)
    ]
    unexpected = matcher.unused()
    if strict and (done.missing or unexpected or done.wrong):
        headline = f"{label} does not fit the model (strict=False loads what fits)"
        raise CheckpointError(_mismatch(headline, label, done, unexpected, arrays))
    if not done.loaded and (done.missing or done.skipped):
        headline = f"no array of {label} fits the model"
        raise CheckpointError(_mismatch(headline, label, done, unexpected, arrays))
    check_filled("load_torch", label, names, new)
    out: T = settle_modes(unflatten(treedef, new))
    if report:
        return out, LoadReport(done.loaded, done.missing, unexpected, done.skipped)
    return out


@dataclasses.dataclass
class _Outcome:
    """What `load_torch` did with each of the model's arrays."""

    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    wrong: list[str] = dataclasses.field(default_factory=list)

    def fill(self, name: str, leaf: Any, matcher: _Matcher) -> Any:
        """The leaf at `name` loaded from the state dict, or kept (and recorded)."""
        found = matcher.find(name)
        if found is None:
            self.missing.append(name)
            return leaf
        value, keys = found
        matcher.used.update(keys)
        fitted = _fit(value, leaf, name)
        if fitted is None:
            source = "" if keys == [name] else f" (from {', '.join(keys)})"
            self.wrong.append(
                f"{name!r}{source}: state dict {describe(value)}, model {describe(leaf)}"
            )
            self.skipped.append(name)
            return leaf
        self.loaded.append(name)
        # A copy: a torch tensor's NumPy view shares its memory, and JAX on CPU may keep
        # using a NumPy buffer as it is, so an optimiser step on the torch model (in
        # place) would otherwise change the loaded model too.
        return fill(leaf, np.array(fitted, copy=True))


def _mismatch(
    headline: str,
    label: str,
    done: _Outcome,
    unexpected: list[str],
    arrays: dict[str, np.ndarray],
) -> str:
    lines = [f"load_torch: {headline}:"]
    if done.missing:
        lines.append(f"  missing from {label} ({len(done.missing)}): " + _names(done.missing))
    if unexpected:
        lines.append(f"  unexpected, not in the model ({len(unexpected)}): " + _names(unexpected))
    if done.wrong:
        lines.append(f"  mis-shaped ({len(done.wrong)}): " + "; ".join(done.wrong))
    heads = {k.split(".", 1)[0] for k in arrays}
    stripped = {k.split(".", 1)[-1] for k in arrays}
    if len(heads) == 1 and all("." in k for k in arrays) and stripped & set(done.missing):
        lines.append(
            f"  every key of {label} starts with {heads.pop() + '.'!r} (a wrapper such as "
            "DataParallel's?): strip it first"
        )
    return "\n".join(lines)


def _names(names: list[str]) -> str:
    return ", ".join(map(repr, names))
