"""Checkpoints: `treenn.save` and `treenn.load`, in the safetensors format.

Arrays are stored under their PyTorch-style dotted paths, so a checkpoint is readable by
any safetensors reader (and a PyTorch state dict maps onto it by name). Frozen status,
modes and pins go in the header's metadata. The format is small enough to read and write
here directly, which also covers dtypes the `safetensors` package cannot load into NumPy
(bfloat16, float8).

Writes are atomic: a temporary file in the same folder, fsync, then rename over the
target, so a crash at any point leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tempfile
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ._selectors import few
from ._status import (
    MARK_TYPES,
    Buffer,
    Frozen,
    Status,
    is_array_leaf,
    marked_like,
    status_of,
    unmarked,
)
from ._tree import (
    check_model,
    dotted,
    field_names,
    fit_classes,
    flatten,
    is_mode_bearing,
    map_stopped,
    modules,
    no_gc,
    replace_fields,
    unflatten,
)

T = TypeVar("T")
PathLike = str | os.PathLike[str]

_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "C64": np.complex64,
    "C128": np.complex128,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_FORMAT = "treenn-1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


# -- the safetensors container ---------------------------------------------------------


def write_safetensors(
    path: PathLike, arrays: dict[str, np.ndarray], metadata: dict[str, str]
) -> None:
    """Write `arrays` to `path` atomically in the safetensors format."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    blobs = []
    for name, array in arrays.items():
        dtype = np.dtype(array.dtype)
        if dtype not in _CODES:
            raise CheckpointError(f"cannot save {name!r}: dtype {dtype} has no safetensors code")
        blob = np.ascontiguousarray(array).astype(dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _CODES[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot save to {target!r}: it is a folder; name a file in it")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {target!r}: the folder {folder!r} does not exist")
    fd, tmp = tempfile.mkstemp(
        dir=folder, prefix="." + os.path.basename(target) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for blob in blobs:
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse to fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def read_safetensors(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file into NumPy arrays and its metadata, validating it."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"no checkpoint at {name!r}")
    with open(name, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise CheckpointError(
            f"{name!r} is truncated or not a safetensors file ({len(data)} bytes)"
        )
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CheckpointError(f"{name!r} is truncated or corrupt: its header claims {size} bytes")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{name!r} is corrupt or not a safetensors file: bad header ({err})"
        ) from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{name!r} is corrupt: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + size :]
    arrays = {}
    for key, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{name!r} is corrupt: bad entry for {key!r} ({err!r})") from err
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= len(body) or end - begin != expected:
            raise CheckpointError(
                f"{name!r} is truncated or corrupt: {key!r} needs bytes {begin}..{end} of "
                f"{len(body)} (expected {expected} bytes for {dtype}{list(shape)})"
            )
        arrays[key] = (
            np.frombuffer(body[begin:end], dtype.newbyteorder("<"))
            .astype(dtype, copy=False)
            .reshape(shape)
        )
    return arrays, metadata


# -- models ------------------------------------------------------------------------------


def _host(leaf: Any) -> tuple[np.ndarray, str | None]:
    array = unmarked(leaf)
    if isinstance(array, jax.Array) and jnp.issubdtype(array.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(array)), str(jax.random.key_impl(array))
    return np.asarray(array), None


@no_gc()
def save(path: PathLike, model: Any) -> None:
    """Save a model's arrays, frozen status, modes and pins to a safetensors file.

    **Arguments:**

    - `path`: the file to write. It is replaced atomically: after a crash at any point
        it holds either the previous checkpoint or the new one.
    - `model`: a treenn or Equinox model.

    Arrays are stored bit-exactly under their dotted paths (`layers.0.weight`).

    !!! Example

        ```python
        treenn.save("model.safetensors", model)
        model = treenn.load("model.safetensors", like=model)
        ```
    """
    check_model(model, "treenn.save")
    paths, leaves, _ = flatten(model)
    arrays: dict[str, np.ndarray] = {}
    frozen, buffers, keys = [], [], {}
    for key_path, leaf in zip(paths, leaves):
        if not is_array_leaf(leaf):
            continue
        name = dotted(key_path)
        if name in arrays:
            raise CheckpointError(f"cannot save: two arrays share the path {name!r}")
        if isinstance(unmarked(leaf), jax.core.Tracer):
            raise CheckpointError(
                f"cannot save {name!r}: it is a traced value (treenn.save was called inside "
                "jit, grad, vmap...); save the model the transformed function returns"
            )
        arrays[name], impl = _host(leaf)
        if impl is not None:
            keys[name] = impl
        status = status_of(leaf)
        if status is Status.FROZEN:
            frozen.append(name)
        elif status is Status.BUFFER:
            buffers.append(name)
    modes = {
        dotted(p): {"inference": bool(m.inference), "pinned": bool(m.__dict__.get("pinned", False))}
        for p, m, _ in modules(model)
        if m is not None and is_mode_bearing(m)
    }
    meta = {"frozen": frozen, "buffers": buffers, "modes": modes, "keys": keys}
    write_safetensors(path, arrays, {"format": _FORMAT, "treenn": json.dumps(meta)})


@no_gc()
def load(path: PathLike, like: T) -> T:
    """Load a checkpoint written by `treenn.save` into a model of the same structure.

    **Arguments:**

    - `path`: the checkpoint file.
    - `like`: a model with the structure to fill (e.g. freshly initialised); the file
        gives the arrays, frozen status, modes and pins. Where `like` is sharded
        (`treenn.shard`), each loaded array gets the sharding of `like`'s.

    **Returns:** the loaded model. Raises `CheckpointError` (a `ValueError`) naming the
    offending paths when the file's arrays, shapes, dtypes or mode-bearing modules do not
    match `like`'s, or when the file is truncated or corrupt; `FileNotFoundError` when
    there is no file.

    !!! Example

        ```python
        model = treenn.load("model.safetensors", like=make_model(key=jax.random.key(0)))
        ```
    """
    check_model(like, "treenn.load", "like")
    arrays, metadata = read_safetensors(path)
    meta = _metadata(path, metadata)
    paths, leaves, treedef = flatten(like)
    names = [dotted(p) if is_array_leaf(x) else None for p, x in zip(paths, leaves)]
    _check_arrays(path, arrays, [(n, x) for n, x in zip(names, leaves) if n is not None])
    frozen = set(meta["frozen"]) if meta else None
    keys = meta["keys"] if meta else {}
    new = []
    for name, leaf in zip(names, leaves):
        if name is None:
            new.append(leaf)
            continue
        stored = arrays[name]
        value: Any = np.array(stored) if _is_numpy(leaf) else jnp.asarray(stored)
        if name in keys:
            value = jax.random.wrap_key_data(value, impl=keys[name])
        like_array = unmarked(leaf)
        if isinstance(like_array, jax.Array) and not isinstance(
            like_array.sharding, jax.sharding.SingleDeviceSharding
        ):
            # A sharded `like` (`treenn.shard`): each array goes where `like`'s is.
            value = jax.device_put(value, like_array.sharding)
        if type(leaf) is Buffer:
            value = Buffer(value)
        elif frozen is None:
            value = marked_like(leaf, value)
        elif name in frozen:
            value = Frozen(value)
        new.append(value)
    model = fit_classes(unflatten(treedef, new))
    return _restore_modes(path, model, meta["modes"]) if meta else model


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `treenn.load_pretrained` matched, like PyTorch's `load_state_dict(strict=False)`.

    - `loaded`: paths filled from the file.
    - `missing`: paths of the model the file lacks (kept as initialised: a new head).
    - `unexpected`: paths of the file the model lacks (ignored: an old head).
    - `skipped`: paths in both whose shape or dtype differ (kept as initialised), when
        `skip_mismatched=True`.
    """

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    skipped: list[str]


@no_gc()
def load_pretrained(
    path: PathLike, like: T, *, skip_mismatched: bool = False
) -> tuple[T, LoadReport]:
    """Load the arrays of a checkpoint that match a model by path, for fine-tuning a
    model whose head (or other parts) differ from the pretrained one.

    **Arguments:**

    - `path`: a checkpoint written by `treenn.save`, or any safetensors file keyed by
        dotted paths.
    - `like`: the model to fill; its frozen status, modes and pins are kept (the file
        gives arrays only).
    - `skip_mismatched`: keep `like`'s array where the file's has another shape or
        dtype, instead of raising.

    **Returns:** `(model, report)`, a `LoadReport` listing loaded, missing, unexpected
    and skipped paths. Raises `CheckpointError` naming every mismatched path unless
    `skip_mismatched=True`, and when nothing matches at all.

    !!! Example

        ```python
        model, report = treenn.load_pretrained("pretrained.safetensors", new_model)
        print(report.missing)     # ['fc.weight', 'fc.bias'] with a new head shape...
        ```
    """
    check_model(like, "treenn.load_pretrained", "like")
    arrays, _ = read_safetensors(path)
    paths, leaves, treedef = flatten(like)
    loaded: list[str] = []
    missing: list[str] = []
    skipped: list[str] = []
    wrong: list[str] = []
    new = []
    for key_path, leaf in zip(paths, leaves):
        name = dotted(key_path) if is_array_leaf(leaf) else None
        if name is None or name not in arrays:
            if name is not None:
                missing.append(name)
            new.append(leaf)
            continue
        array = leaf.value if type(leaf) in MARK_TYPES else leaf
        stored = arrays[name]
        if tuple(stored.shape) != tuple(array.shape) or stored.dtype != np.dtype(array.dtype):
            skipped.append(name)
            wrong.append(
                f"{name!r}: file {stored.dtype}{list(stored.shape)}, "
                f"model {np.dtype(array.dtype)}{list(array.shape)}"
            )
            new.append(leaf)
            continue
        value = np.array(stored) if _is_numpy(leaf) else jnp.asarray(stored)
        new.append(type(leaf)(value) if type(leaf) in MARK_TYPES else value)
        loaded.append(name)
    if wrong and not skip_mismatched:
        raise CheckpointError(
            f"load_pretrained({os.fspath(path)!r}): shape/dtype mismatch (pass "
            f"skip_mismatched=True to keep the model's): " + "; ".join(wrong)
        )
    if not loaded:
        raise CheckpointError(
            f"load_pretrained({os.fspath(path)!r}): no array of the file matches the model "
            f"by path; file: {few(sorted(arrays))}; model: {few(missing)}"
        )
    unexpected = sorted(arrays.keys() - set(loaded) - set(skipped))
    return unflatten(treedef, new), LoadReport(loaded, missing, unexpected, skipped)


def _is_numpy(leaf: Any) -> bool:
    # NumPy leaves stay NumPy (jnp.asarray would truncate 64-bit values without x64).
    return isinstance(leaf.value if type(leaf) in MARK_TYPES else leaf, (np.ndarray, np.generic))


def _metadata(path: PathLike, metadata: dict[str, str]) -> dict[str, Any] | None:
    """treenn's metadata of a checkpoint, validated; None for a plain safetensors file."""
    if "treenn" not in metadata:
        return None
    try:
        meta = json.loads(metadata["treenn"])
        ok = (
            isinstance(meta, dict)
            and all(isinstance(meta.get(k), list) for k in ("frozen", "buffers"))
            and all(isinstance(meta.get(k), dict) for k in ("modes", "keys"))
            and all(isinstance(n, str) for n in meta["frozen"])
            and all(
                isinstance(m, dict)
                and isinstance(m.get("inference"), bool)
                and isinstance(m.get("pinned"), bool)
                for m in meta["modes"].values()
            )
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{os.fspath(path)!r} is corrupt: bad treenn metadata in its header")
    return meta


def _check_arrays(
    path: PathLike, arrays: dict[str, np.ndarray], expected: list[tuple[str, Any]]
) -> None:
    want = {name for name, _ in expected}
    missing = sorted(want - arrays.keys())
    unexpected = sorted(arrays.keys() - want)
    wrong = []
    for name, leaf in expected:
        if name not in arrays:
            continue
        host, _ = _host(leaf) if _is_key(leaf) else (None, None)
        array = leaf.value if type(leaf) in MARK_TYPES else leaf
        shape = host.shape if host is not None else tuple(array.shape)
        dtype = host.dtype if host is not None else np.dtype(array.dtype)
        got = arrays[name]
        if tuple(got.shape) != tuple(shape) or got.dtype != dtype:
            wrong.append(f"{name!r}: file {got.dtype}{list(got.shape)}, model {dtype}{list(shape)}")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing from the file: {few(missing)}")
        if unexpected:
            parts.append(f"not in the model: {few(unexpected)}")
        if wrong:
            parts.append(
                "shape/dtype mismatch: "
                + "; ".join(wrong[:5])
                + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else "")
            )
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not fit the model: " + ". ".join(parts)
        )


def _is_key(leaf: Any) -> bool:
    array = leaf.value if type(leaf) in MARK_TYPES else leaf
    return isinstance(array, jax.Array) and jnp.issubdtype(array.dtype, jax.dtypes.prng_key)


def _restore_modes(path: PathLike, model: Any, modes: dict[str, dict[str, bool]]) -> Any:
    seen = set()

    def restore(p: Any, module: Any) -> Any:
        name = dotted(p)
        seen.add(name)
        if name not in modes:
            return module
        want = modes[name]
        changes: dict[str, Any] = {"inference": want["inference"]}
        if "pinned" in field_names(type(module)):
            changes["pinned"] = want["pinned"]
        elif want["pinned"]:
            raise CheckpointError(
                f"checkpoint pins {name!r}, but the model's {type(module).__name__} "
                "cannot be pinned"
            )
        return replace_fields(module, **changes)

    model = map_stopped(model, is_mode_bearing, restore)
    if is_mode_bearing(model):
        model = restore((), model)
    extra = sorted(modes.keys() - seen)
    lacking = sorted(seen - modes.keys())
    if extra or lacking:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not fit the model's mode-bearing modules: "
            + "; ".join(
                part
                for part in (
                    f"in the file only: {few(extra)}" if extra else "",
                    f"in the model only: {few(lacking)}" if lacking else "",
                )
                if part
            )
        )
    return model
