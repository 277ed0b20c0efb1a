"""Checkpoints: `treenn.save` and `treenn.load`, in the safetensors format.

Arrays are stored under their PyTorch-style dotted paths, so a checkpoint is readable by
any safetensors reader (and a PyTorch state dict maps onto it by name). Frozen status,
modes, pins, PRNG key types and Python `int`/`float`/`bool` leaves go in the header's
metadata. The format is small enough to read and write here directly, which also covers
dtypes the `safetensors` package cannot load into NumPy (bfloat16, float8).

Writes are atomic: a temporary file in the same folder, fsync, then rename over the
target (a symlink's target), so a crash at any point leaves either the old checkpoint or
the new one. Arrays are streamed to the file one at a time, and read back one at a time:
neither direction holds a second copy of the model in host memory.

Reading validates everything before it trusts it: a damaged or truncated file is a
`CheckpointError` naming the file, never another exception or a silent change.

All three loaders (`load`, `load_pretrained` and `treenn.load_torch`) put arrays into
the model through `fill`, so they place, mark and fill abstract models alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
import struct
import tempfile
import zlib
from typing import Any, BinaryIO, TypeVar

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ._modes import mode_of, with_mode
from ._selectors import few
from ._status import (
    Buffer,
    Frozen,
    Pinned,
    Status,
    is_array_leaf,
    is_inexact,
    marked_like,
    status_of,
    unmarked,
)
from ._tree import (
    check_model,
    dotted,
    fit_classes,
    flatten,
    is_mode_bearing,
    map_stopped,
    modules,
    no_gc,
    state_of,
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
# treenn-2 adds Python scalar leaves; treenn-1 files (without them) still load.
_FORMAT = "treenn-2"
_FORMATS = ("treenn-1", "treenn-2")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header's size
_SCALARS: dict[str, type] = {"bool": bool, "int": int, "float": float}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model: raised by
    `treenn.save`, `treenn.load`, `treenn.load_pretrained` and `treenn.load_torch`, with
    a message naming the file and every offending path. A subclass of `ValueError`.

    **Arguments:**

    - `message`: what is wrong, as for any exception (raised by treenn, not by users).

    **Returns:** an exception instance; `str(error)` is the message.

    !!! Example

        ```python
        try:
            model = treenn.load("model.safetensors", like=model)
        except treenn.CheckpointError as error:
            print(error)  # ...does not fit the model: shape/dtype/type mismatch: 'fc.weight'...
        ```
    """


# -- the safetensors container ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One array of a safetensors file: dtype, shape and byte span within the body."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    begin: int
    end: int


def _code(name: str, dtype: Any) -> str:
    code = _CODES.get(np.dtype(dtype))
    if code is None:
        raise CheckpointError(f"cannot save {name!r}: dtype {dtype} has no safetensors code")
    return code


def write_safetensors(path: PathLike, arrays: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write `arrays` (host or device arrays) to `path` atomically, in the safetensors
    format, streaming them one at a time."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, array in arrays.items():
        code = _code(name, array.dtype)
        size = math.prod(array.shape) * np.dtype(array.dtype).itemsize
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with _atomic(path) as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for array in arrays.values():
            f.write(_bytes_of(array).data)


def _bytes_of(array: Any) -> np.ndarray:
    """`array`'s little-endian bytes, as a flat uint8 view where possible (write its
    `.data`: numpy types `ndarray` as a buffer only on Python 3.12+).

    An array on an accelerator, or sharded over several devices, is gathered into a
    fresh single-device host array first: `np.asarray` of it would keep its host copy
    cached on the array after `save` returns, a second copy of the whole model.
    """
    if isinstance(array, jax.Array):
        devices = array.devices()
        if len(devices) > 1 or next(iter(devices)).platform != "cpu":
            array = jax.device_put(array, jax.devices("cpu")[0])
    host = np.ascontiguousarray(np.asarray(array)).reshape(-1)
    if host.dtype.byteorder == ">":
        host = host.astype(host.dtype.newbyteorder("<"))
    return host.view(np.uint8)


class _atomic:  # noqa: N801 (a context manager used like a function)
    """Write a file atomically: a temporary file beside the target, fsync, rename.

    A symlink is resolved first, so the link keeps pointing at the (new) file. A new
    file gets the permissions `open` would give it (0666 & ~umask), as `np.save` and
    `torch.save` do; an overwritten file keeps its own.
    """

    def __init__(self, path: PathLike):
        target = os.path.realpath(os.fspath(path))
        folder = os.path.dirname(target)
        if os.path.isdir(target):
            raise IsADirectoryError(
                f"cannot save to {os.fspath(path)!r}: it is a folder; name a file in it"
            )
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"cannot save to {os.fspath(path)!r}: the folder {folder!r} does not exist"
            )
        self.target, self.folder = target, folder

    def __enter__(self) -> BinaryIO:
        fd, self.tmp = tempfile.mkstemp(
            dir=self.folder, prefix="." + os.path.basename(self.target) + ".", suffix=".tmp"
        )
        try:
            os.fchmod(fd, _mode_for(self.target))
            self.file: BinaryIO = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            os.unlink(self.tmp)
            raise
        return self.file

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        try:
            try:
                if kind is None:
                    self.file.flush()
                    os.fsync(self.file.fileno())
            finally:
                self.file.close()
            if kind is None:
                os.replace(self.tmp, self.target)
        except BaseException:
            _remove(self.tmp)
            raise
        if kind is not None:
            _remove(self.tmp)
            return
        _fsync_folder(self.folder)


def _mode_for(target: str) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # the only way to read it; set straight back
        os.umask(umask)
        return 0o666 & ~umask


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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


class SafetensorsFile:
    """An open safetensors file whose header has been validated; arrays are read on
    demand, one at a time (`read`)."""

    def __init__(self, path: PathLike):
        self.name = os.fspath(path)
        self.label = repr(self.name)
        if not os.path.exists(self.name):
            raise FileNotFoundError(f"no checkpoint at {self.label}")
        self.file = open(self.name, "rb")  # noqa: SIM115 (closed by close())
        try:
            self.entries, self.metadata = self._header()
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()

    def corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.label} is truncated or corrupt: {why}")

    def _header(self) -> tuple[dict[str, Entry], dict[str, str]]:
        total = os.fstat(self.file.fileno()).st_size
        if total < 8:
            raise CheckpointError(
                f"{self.label} is truncated or not a safetensors file ({total} bytes)"
            )
        (size,) = struct.unpack("<Q", self.file.read(8))
        if size > min(total - 8, _MAX_HEADER):
            raise self.corrupt(f"its header claims {size} bytes of {total - 8}")
        raw = self.file.read(size)
        if len(raw) != size:
            raise self.corrupt("the file shrank while it was read")
        try:
            header = json.loads(raw, object_pairs_hook=_unique)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            raise self.corrupt(f"bad header, not safetensors JSON ({type(err).__name__})") from err
        if not isinstance(header, dict):
            raise self.corrupt("the header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self.corrupt("its __metadata__ is not a mapping of strings to strings")
        self.body = 8 + size
        entries = {key: self._entry(key, info) for key, info in header.items()}
        self._check_tiling(entries, total - self.body)
        return entries, metadata

    def _entry(self, key: str, info: Any) -> Entry:
        fields = info if isinstance(info, dict) else {}
        dtype = fields.get("dtype")
        shape = fields.get("shape")
        offsets = fields.get("data_offsets")
        if not (
            isinstance(dtype, str)
            and dtype in _DTYPES
            and isinstance(shape, list)
            and all(_is_count(s) for s in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
        ):
            raise self.corrupt(f"bad entry for {key!r}: {_short(info)}")
        entry = Entry(np.dtype(_DTYPES[dtype]), tuple(shape), offsets[0], offsets[1])
        expected = math.prod(entry.shape) * entry.dtype.itemsize
        if entry.end - entry.begin != expected:
            raise self.corrupt(
                f"{key!r} spans bytes {entry.begin}..{entry.end}, but {dtype}{list(shape)} "
                f"needs {expected} bytes"
            )
        return entry

    def _check_tiling(self, entries: dict[str, Entry], length: int) -> None:
        """The arrays tile the body exactly, as the format requires: no gap, no overlap,
        nothing cut off (a truncated file fails here)."""
        at = 0
        for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if entry.begin != at:
                raise self.corrupt(
                    f"{key!r} starts at byte {entry.begin} of the data, expected {at}"
                )
            at = entry.end
        if at != length:
            raise self.corrupt(f"the arrays need {at} bytes of data, the file has {length}")

    def read(self, key: str) -> np.ndarray:
        """The array `key`, read into a fresh host array."""
        entry = self.entries[key]
        array = np.empty(entry.shape, entry.dtype.newbyteorder("<"))
        self.file.seek(self.body + entry.begin)
        if self.file.readinto(array.reshape(-1).view(np.uint8).data) != entry.end - entry.begin:
            raise self.corrupt(f"the file shrank while {key!r} was read")
        return array.astype(entry.dtype, copy=False)

    def read_all(self) -> dict[str, np.ndarray]:
        return {key: self.read(key) for key in self.entries}


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names no key twice (`json` would keep the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice")
    return out


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 120 else text[:117] + "..."


def read_safetensors(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a whole safetensors file into NumPy arrays and its metadata, validating it."""
    with SafetensorsFile(path) as file:
        return file.read_all(), file.metadata


# -- the one fill path of every loader ----------------------------------------------------


def is_slot(leaf: Any) -> bool:
    """An array position of a model a loader fills: an array, a marked one, or an
    abstract one (`jax.eval_shape`'s `ShapeDtypeStruct`)."""
    return is_array_leaf(leaf) or isinstance(unmarked(leaf), jax.ShapeDtypeStruct)


def is_abstract(leaf: Any) -> bool:
    return isinstance(unmarked(leaf), jax.ShapeDtypeStruct)


def _is_key_dtype(dtype: Any) -> bool:
    return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))


def layout(leaf: Any) -> tuple[tuple[int, ...], np.dtype[Any], str | None]:
    """What a slot holds as stored: `(shape, dtype, key implementation or None)`; a PRNG
    key as its raw data (`jax.random.key_data`)."""
    array = unmarked(leaf)
    if _is_key_dtype(array.dtype):
        data = jax.eval_shape(jax.random.key_data, array)
        return tuple(data.shape), np.dtype(data.dtype), array.dtype._impl.name
    return tuple(array.shape), np.dtype(array.dtype), None


def describe(leaf: Any) -> str:
    shape, dtype, impl = layout(leaf)
    return f"key<{impl}>{list(shape)}" if impl else f"{dtype}{list(shape)}"


def _is_numpy(leaf: Any) -> bool:
    # NumPy leaves stay NumPy (jnp.asarray would truncate 64-bit values without x64).
    return isinstance(unmarked(leaf), (np.ndarray, np.generic))


_AS_LIKE = object()


def fill(leaf: Any, value: np.ndarray, *, impl: str | None = None, mark: Any = _AS_LIKE) -> Any:
    """`value` (a host array the caller owns) put where the model's `leaf` was.

    NumPy where the model held NumPy; otherwise a JAX array on `leaf`'s devices (its
    sharding, also an abstract leaf's when it has one); a PRNG key of implementation
    `impl` where given. `mark`: the status mark to wrap it in (`Frozen`, `Buffer` or
    `None`); by default `leaf`'s own.
    """
    array = unmarked(leaf)
    new: Any
    if _is_numpy(leaf):
        new = value
    elif isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
        new = jax.device_put(value, array.sharding)
    elif isinstance(array, jax.ShapeDtypeStruct) and array.sharding is not None:
        new = jax.device_put(value, array.sharding)
    else:
        new = jnp.asarray(value)
    if impl is not None:
        new = jax.random.wrap_key_data(new, impl=impl)
    if mark is _AS_LIKE:
        return marked_like(leaf, new)
    return new if mark is None else mark(new)


def array_slots(model: Any, paths: list[Any], leaves: list[Any]) -> list[str | None]:
    """The dotted path of each leaf a loader fills with an array, `None` for the others
    (an abstract model's `inference` flags included: modes are no arrays)."""
    mode_paths = _mode_paths(model)
    names: list[str | None] = []
    for p, leaf in zip(paths, leaves):
        name = dotted(p) if is_slot(leaf) else None
        names.append(None if name in mode_paths else name)
    return names


def check_filled(fn: str, label: str, names: list[str | None], new: list[Any]) -> None:
    """An abstract model must come out whole: no `ShapeDtypeStruct` left in an array
    slot (`names`, from `array_slots`)."""
    unfilled = [n for n, x in zip(names, new) if n is not None and is_abstract(x)]
    if unfilled:
        raise CheckpointError(
            f"{fn}: the model is abstract (jax.eval_shape) and {label} does not fill "
            f"{len(unfilled)} of its arrays: {few(unfilled)}"
        )


# -- models ------------------------------------------------------------------------------


def _is_scalar(leaf: Any) -> bool:
    return type(leaf) in (bool, int, float)


def _mode_paths(model: Any) -> set[str]:
    """Dotted paths of the `inference` fields of mode-bearing modules: the metadata's
    modes carry them, not the scalars."""
    return {(f"{dotted(p)}.inference" if p else "inference") for p, _ in _modal(model)}


def _scalar_record(value: bool | int | float) -> dict[str, str | bool]:
    if type(value) is bool:
        return {"type": "bool", "value": value}
    if type(value) is int:
        return {"type": "int", "value": str(value)}
    # The float's bits: exact for every value (NaN payloads and -0.0 included).
    return {"type": "float", "value": struct.pack(">d", value).hex()}


_INT = re.compile(r"-?[0-9]{1,4300}")
_FLOAT_BITS = re.compile(r"[0-9a-f]{16}")


def _scalar_value(record: Any) -> bool | int | float | None:
    """A scalar record's value, or None when the record is damaged."""
    if not isinstance(record, dict) or set(record) != {"type", "value"}:
        return None
    kind, value = record["type"], record["value"]
    if kind == "bool" and type(value) is bool:
        return value
    if kind == "int" and isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    if kind == "float" and isinstance(value, str) and _FLOAT_BITS.fullmatch(value):
        return float(struct.unpack(">d", bytes.fromhex(value))[0])
    return None


@no_gc()
def save(path: PathLike, model: Any) -> None:
    """Save a model's arrays, frozen status, modes, pins and Python scalars to a
    safetensors file.

    **Arguments:**

    - `path`: the file to write. It is replaced atomically: after a crash at any point
        it holds either the previous checkpoint or the new one. A symlink keeps pointing
        at it; a new file gets the usual permissions (`0666` less the umask), an
        overwritten one keeps its own.
    - `model`: a treenn or Equinox model, or any pytree holding one (`{"model": model,
        "opt_state": opt_state, "step": 1234}`).

    Arrays are stored bit-exactly under their dotted paths (`layers.0.weight`), and
    written one at a time: saving needs no more extra host memory than the largest
    array. Python `int`, `float` and `bool` leaves are stored exactly in the metadata.

    **Returns:** `None`; the checkpoint is in the file. Raises `CheckpointError` for what
    it cannot store faithfully: two leaves sharing a path, a traced value (a call inside
    `jit`), a dtype safetensors has no code for.

    !!! Example

        ```python
        treenn.save("model.safetensors", model)
        model = treenn.load("model.safetensors", like=model)
        ```
    """
    check_model(model, "treenn.save")
    paths, leaves, _ = flatten(model)
    mode_paths = _mode_paths(model)
    arrays: dict[str, Any] = {}
    frozen, buffers, keys, scalars = [], [], {}, {}
    for key_path, leaf in zip(paths, leaves):
        name = dotted(key_path)
        if _is_scalar(leaf) and name not in mode_paths:
            if name in scalars:
                raise CheckpointError(f"cannot save: two leaves share the path {name!r}")
            scalars[name] = _scalar_record(leaf)
            continue
        if not is_array_leaf(leaf):
            continue
        if name in arrays:
            raise CheckpointError(f"cannot save: two arrays share the path {name!r}")
        array = unmarked(leaf)
        if isinstance(array, jax.core.Tracer):
            raise CheckpointError(
                f"cannot save {name!r}: it is a traced value (treenn.save was called inside "
                "jit, grad, vmap...); save the model the transformed function returns"
            )
        if _is_key_dtype(array.dtype):
            keys[name] = layout(array)[2]
            array = jax.random.key_data(array)
        _code(name, array.dtype)
        arrays[name] = array
        status = status_of(leaf)
        if status is Status.FROZEN:
            frozen.append(name)
        elif status is Status.BUFFER:
            buffers.append(name)
    if scalars.keys() & arrays.keys():
        raise CheckpointError(
            f"cannot save: {few(sorted(scalars.keys() & arrays.keys()))} name both an array "
            "and a Python scalar"
        )
    modes = {}
    for p, module in _modal(model):
        inference, pinned = mode_of(module)
        modes[dotted(p)] = {"inference": inference, "pinned": pinned}
    meta = {
        "frozen": frozen,
        "buffers": buffers,
        "modes": modes,
        "keys": keys,
        "scalars": scalars,
    }
    text = json.dumps(meta)
    write_safetensors(path, arrays, {"format": _FORMAT, "treenn": text, "treenn_crc32": _crc(text)})


def _crc(text: str) -> str:
    # The metadata's checksum: without it, one flipped bit in a Python scalar's digits
    # or a frozen name loads silently (74 of 12,928 single-bit header flips).
    return f"{zlib.crc32(text.encode()):08x}"


@dataclasses.dataclass
class _Slots:
    """A model's positions a checkpoint fills, by dotted path."""

    arrays: dict[str, Any]  # path -> the model's leaf (array, marked or abstract)
    scalars: dict[str, Any]  # path -> Python scalar (or abstract scalar) leaf

    @classmethod
    def of(cls, paths: list[Any], leaves: list[Any], mode_paths: set[str]) -> _Slots:
        arrays, scalars = {}, {}
        for p, leaf in zip(paths, leaves):
            if not (_is_scalar(leaf) or is_slot(leaf)):
                continue
            name = dotted(p)
            if name in mode_paths:
                continue  # `inference`: the metadata's modes restore it
            if _is_scalar(leaf):
                scalars[name] = leaf
            else:
                arrays[name] = leaf
        return cls(arrays, scalars)


@no_gc()
def load(path: PathLike, like: T) -> T:
    """Load a checkpoint written by `treenn.save` into a model of the same structure.

    **Arguments:**

    - `path`: the checkpoint file.
    - `like`: a model (or pytree) with the structure to fill, e.g. freshly initialised,
        or abstract (`jax.eval_shape`, nothing initialised); the file gives the arrays,
        frozen status, modes, pins and Python scalars. Where `like` is sharded
        (`treenn.shard`), each loaded array gets the sharding of `like`'s.

    **Returns:** the loaded model. Raises `CheckpointError` (a `ValueError`) naming the
    offending paths when the file's arrays, shapes, dtypes, scalars or mode-bearing
    modules do not match `like`'s, and naming the file when it is truncated or corrupt;
    `FileNotFoundError` when there is no file.

    !!! Example

        ```python
        model = treenn.load("model.safetensors", like=make_model(key=jax.random.key(0)))
        abstract = jax.eval_shape(lambda: make_model(key=jax.random.key(0)))
        model = treenn.load("model.safetensors", like=abstract)
        ```
    """
    check_model(like, "treenn.load", "like")
    with SafetensorsFile(path) as file:
        meta = _metadata(file)
        paths, leaves, treedef = flatten(like)
        slots = _Slots.of(paths, leaves, _mode_paths(like))
        scalars = _check_fit(file, meta, slots)
        new = []
        for p, leaf in zip(paths, leaves):
            name = dotted(p)
            if name in scalars:
                new.append(scalars[name])
            elif slots.arrays.get(name) is leaf:
                new.append(_fill_from_file(file, meta, name, leaf))
            else:
                new.append(leaf)
    check_filled("treenn.load", file.label, array_slots(like, paths, leaves), new)
    model = fit_classes(unflatten(treedef, new))
    return _restore_modes(file, model, meta["modes"]) if meta else model


def _fill_from_file(
    file: SafetensorsFile, meta: dict[str, Any] | None, name: str, leaf: Any
) -> Any:
    impl = layout(leaf)[2]
    if meta is None:
        return fill(leaf, file.read(name), impl=impl)  # a foreign file: statuses of `like`
    if type(leaf) is Buffer:
        mark: Any = Buffer
    elif name in meta["frozen"]:
        mark = Frozen
    else:
        mark = None
    return fill(leaf, file.read(name), impl=impl, mark=mark)


def _check_fit(file: SafetensorsFile, meta: dict[str, Any] | None, slots: _Slots) -> dict[str, Any]:
    """Raise, naming every offending path, unless the file fits the model; return the
    Python scalars to put in it."""
    want, have = slots.arrays, file.entries
    missing = sorted(want.keys() - have.keys())
    unexpected = sorted(have.keys() - want.keys())
    wrong = []
    for name in want.keys() & have.keys():
        shape, dtype, impl = layout(want[name])
        entry = have[name]
        if entry.shape != shape or entry.dtype != dtype:
            wrong.append(
                f"{name!r}: file {entry.dtype}{list(entry.shape)}, model {describe(want[name])}"
            )
        elif meta is not None and meta["keys"].get(name) != impl:
            stored = meta["keys"].get(name)
            wrong.append(
                f"{name!r}: file {f'key<{stored}>' if stored else entry.dtype}"
                f"{list(entry.shape)}, model {describe(want[name])}"
            )
    scalars: dict[str, Any] = {}
    if meta is not None and "scalars" in meta:
        stored = meta["scalars"]
        abstract_scalars = {
            n for n in missing if n in stored and want[n].shape == () and is_abstract(want[n])
        }
        missing = [n for n in missing if n not in abstract_scalars]
        missing += sorted(slots.scalars.keys() - stored.keys())
        unexpected += sorted(stored.keys() - slots.scalars.keys() - abstract_scalars)
        for name in sorted(stored.keys() & (slots.scalars.keys() | abstract_scalars)):
            value = _scalar_value(stored[name])
            like_leaf = slots.scalars.get(name)
            if like_leaf is not None and type(like_leaf) is not type(value):
                wrong.append(
                    f"{name!r}: file {type(value).__name__} {value!r}, model "
                    f"{type(like_leaf).__name__}"
                )
            scalars[name] = value
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing from the file: {few(sorted(missing))}")
        if unexpected:
            parts.append(f"not in the model: {few(sorted(unexpected))}")
        if wrong:
            parts.append(
                "shape/dtype/type mismatch: "
                + "; ".join(sorted(wrong)[:5])
                + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else "")
            )
        raise CheckpointError(
            f"checkpoint {file.label} does not fit the model: " + ". ".join(parts)
        )
    if meta is not None:
        _check_statuses(file, meta, slots)
    return scalars


def _check_statuses(file: SafetensorsFile, meta: dict[str, Any], slots: _Slots) -> None:
    """The metadata's frozen and buffer names name arrays that can have that status:
    a damaged name would otherwise silently leave an array trainable."""
    bad = [f"key {name!r}" for name in meta["keys"] if name not in file.entries]
    for name in meta["frozen"]:
        leaf = slots.arrays.get(name)
        if leaf is None or type(leaf) is Buffer or not is_inexact(layout(leaf)[1]):
            bad.append(f"frozen {name!r}")
    for name in meta["buffers"]:
        if type(slots.arrays.get(name)) is not Buffer:
            bad.append(f"buffer {name!r}")
    if bad:
        raise CheckpointError(
            f"checkpoint {file.label} is corrupt or does not fit the model: its metadata "
            f"marks {few(bad)}, which the model has no such array for"
        )


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `treenn.load_pretrained` matched, like PyTorch's `load_state_dict(strict=False)`.
    Made by `treenn.load_pretrained`, not by users; every list holds dotted paths.

    **Arguments:** (its fields)

    - `loaded`: paths filled from the file.
    - `missing`: paths of the model the file lacks (kept as initialised: a new head).
    - `unexpected`: paths of the file the model lacks (ignored: an old head).
    - `skipped`: paths in both whose shape or dtype differ (kept as initialised), when
        `skip_mismatched=True`.

    **Returns:** a frozen dataclass with those four fields.

    !!! Example

        ```python
        model, report = treenn.load_pretrained(
            "pretrained.safetensors", new_model, skip_mismatched=True
        )
        print(report.skipped)  # ['layers.2.weight', 'layers.2.bias']: a new head size
        assert not report.missing and not report.unexpected
        ```
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
        gives arrays only). It may be abstract (`jax.eval_shape`); then the file must
        fill every array.
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
    with SafetensorsFile(path) as file:
        paths, leaves, treedef = flatten(like)
        loaded: list[str] = []
        missing: list[str] = []
        skipped: list[str] = []
        wrong: list[str] = []
        new = []
        names = array_slots(like, paths, leaves)
        for name, leaf in zip(names, leaves):
            if name is None or name not in file.entries:
                if name is not None:
                    missing.append(name)
                new.append(leaf)
                continue
            entry = file.entries[name]
            shape, dtype, impl = layout(leaf)
            if entry.shape != shape or entry.dtype != dtype:
                skipped.append(name)
                wrong.append(
                    f"{name!r}: file {entry.dtype}{list(entry.shape)}, model {describe(leaf)}"
                )
                new.append(leaf)
                continue
            new.append(fill(leaf, file.read(name), impl=impl))
            loaded.append(name)
        unexpected = sorted(file.entries.keys() - set(loaded) - set(skipped))
    label = f"load_pretrained({file.name!r})"
    if wrong and not skip_mismatched:
        raise CheckpointError(
            f"{label}: shape/dtype mismatch (pass skip_mismatched=True to keep the model's): "
            + "; ".join(wrong)
        )
    if not loaded:
        # Name the model's arrays whether they were missing or skipped for their shape.
        raise CheckpointError(
            f"{label}: no array of the file matches the model by path, shape and dtype; "
            f"file: {few(sorted(file.entries))}; model: {few(sorted(missing + skipped))}"
            + (f"; skipped for shape/dtype: {'; '.join(wrong)}" if wrong else "")
        )
    check_filled("treenn.load_pretrained", file.label, names, new)
    model = settle_modes(unflatten(treedef, new))
    return model, LoadReport(loaded, missing, unexpected, skipped)


def _metadata(file: SafetensorsFile) -> dict[str, Any] | None:
    """treenn's metadata of a checkpoint, validated; None for a plain safetensors file."""
    metadata = file.metadata
    form = metadata.get("format")
    if "treenn" not in metadata and not (isinstance(form, str) and form.startswith("treenn")):
        return None  # another tool's file ({"format": "pt"}, say)
    if "treenn" not in metadata:
        raise file.corrupt(f"its format is {form!r}, but its treenn metadata is missing")
    if form not in _FORMATS:
        raise file.corrupt(
            f"unknown treenn format {metadata.get('format')!r} (expected one of {_FORMATS}; "
            "written by a newer treenn?)"
        )
    newer = form != "treenn-1"
    if newer and metadata.get("treenn_crc32") != _crc(metadata["treenn"]):
        raise file.corrupt("its treenn metadata does not match its checksum")
    try:
        meta = json.loads(metadata["treenn"], object_pairs_hook=_unique)
    except (ValueError, RecursionError):
        meta = None
    if not _valid_metadata(meta, scalars=newer):
        raise file.corrupt("bad treenn metadata in its header")
    return meta


def _valid_metadata(meta: Any, *, scalars: bool) -> bool:
    if not isinstance(meta, dict):
        return False
    lists, dicts = ("frozen", "buffers"), ("modes", "keys") + (("scalars",) if scalars else ())
    return (
        all(isinstance(meta.get(k), list) for k in lists)
        and all(isinstance(meta.get(k), dict) for k in dicts)
        and all(isinstance(n, str) for k in lists for n in meta[k])
        and all(
            isinstance(m, dict)
            and set(m) == {"inference", "pinned"}
            and isinstance(m["inference"], bool)
            and isinstance(m["pinned"], bool)
            for m in meta["modes"].values()
        )
        and all(isinstance(v, str) for v in meta["keys"].values())
        and (not scalars or all(_scalar_value(r) is not None for r in meta["scalars"].values()))
    )


def _has_mode(module: Any) -> bool:
    # An optimiser state's copy of a mode-bearing module holds `None` (trainable()
    # leaves no bool): it has no mode to save or restore.
    return state_of(module).get("inference") is not None


def _modal(model: Any) -> list[tuple[Any, Any]]:
    """`(path, module)` of every mode-bearing module holding a mode."""
    return [
        (p, m)
        for p, m, _ in modules(model)
        if m is not None and is_mode_bearing(m) and _has_mode(m)
    ]


def _restore_modes(file: SafetensorsFile, model: Any, modes: dict[str, dict[str, bool]]) -> Any:
    """The file's modes and pins on the model's mode-bearing modules, which must be the
    file's: a name that matches nothing is an error."""
    seen = set()

    def restore(p: Any, module: Any) -> Any:
        if not _has_mode(module):
            return module
        name = dotted(p)
        seen.add(name)
        if name not in modes:
            return module
        return with_mode(module, modes[name]["inference"], modes[name]["pinned"])

    model = map_stopped(model, is_mode_bearing, restore)
    if is_mode_bearing(model):
        model = restore((), model)
    extra = sorted(modes.keys() - seen)
    lacking = sorted(seen - modes.keys())
    if extra or lacking:
        raise CheckpointError(
            f"checkpoint {file.label} does not fit the model's mode-bearing modules: "
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


def settle_modes(model: Any) -> Any:
    """An abstract model's modes made concrete, for the loaders that have no modes to
    give (`load_pretrained`, `load_torch`).

    `jax.eval_shape` turns each `inference` bool into a `ShapeDtypeStruct`, losing its
    value. An unpinned module comes back in training mode, as every layer is built (and
    as `train_step`/`eval_step` switch it anyway); a pinned one is an error, since its
    pinned mode is lost (`eqx.filter_eval_shape` keeps it).
    """
    lost = []

    def settle(p: Any, module: Any) -> Any:
        raw = state_of(module).get("inference")
        pinned = type(raw) is Pinned
        value = raw.value if type(raw) is Pinned else raw  # (mypy narrows only here)
        if not isinstance(value, jax.ShapeDtypeStruct):
            return module
        if pinned:
            lost.append(dotted(p))
        return with_mode(module, False, pinned)

    model = map_stopped(model, is_mode_bearing, settle)
    model = settle((), model) if is_mode_bearing(model) else model
    if lost:
        raise CheckpointError(
            f"the model is abstract and pins {few(lost)}, whose pinned modes "
            "jax.eval_shape lost; build it with eqx.filter_eval_shape, or pin after loading"
        )
    return model
