"""The safetensors container: validated reading, and atomic, streamed writing.

A safetensors file is an 8-byte little-endian header length, a JSON header (each array's
dtype, shape and byte span, plus a `__metadata__` mapping of strings to strings), then
the arrays' bytes, tiling the body exactly. The format is small enough to read and write
here directly, which also covers dtypes the `safetensors` package cannot load into NumPy
(bfloat16, float8).

Writes are atomic: a temporary file in the same folder, fsync, then rename over the
target (a symlink's target), so a crash at any point leaves either the old file or the
new one. Arrays are streamed to the file one at a time, and read back one at a time:
neither direction holds a second copy of the model in host memory.

Reading validates everything before it trusts it: a damaged or truncated file is a
`CheckpointError` naming the file, never another exception or a silent change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import stat
import struct
from typing import Any, BinaryIO

import jax
import ml_dtypes
import numpy as np

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
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header's size


# The header key the format reserves for its metadata (the safetensors specification):
# an array stored under it would overwrite the metadata.
METADATA_KEY = "__metadata__"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model: raised by
    `treenn.save`, `treenn.load`, `treenn.load_pretrained`, `treenn.load_trainable` and
    `treenn.load_torch`, with a message naming the file and every offending path. A
    subclass of `ValueError`.

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


def reserved_name(name: str) -> str:
    """The error for an array at the path the format reserves for the header's metadata:
    stored there, it would replace the metadata, and the file would not load."""
    return (
        f"cannot save the array at {name!r}: safetensors reserves that name for the "
        "file's metadata; rename the field or dict key that holds it"
    )


# -- the safetensors container ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One array of a safetensors file: dtype, shape and byte span within the body."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    begin: int
    end: int


def dtype_code(name: str, dtype: Any) -> str:
    code = _CODES.get(np.dtype(dtype))
    if code is None:
        raise CheckpointError(f"cannot save {name!r}: dtype {dtype} has no safetensors code")
    return code


def write_safetensors(path: PathLike, arrays: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write `arrays` (host or device arrays) to `path` atomically, in the safetensors
    format, streaming them one at a time."""
    if METADATA_KEY in arrays:
        raise CheckpointError(reserved_name(METADATA_KEY))
    header: dict[str, Any] = {METADATA_KEY: metadata}
    offset = 0
    for name, array in arrays.items():
        code = dtype_code(name, array.dtype)
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
    `torch.save` do; an overwritten file keeps its own. No process-wide state (the
    umask) is touched: other threads' files keep their permissions.
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
        fd, self.tmp = temporary_beside(self.target)
        try:
            mode = _existing_mode(self.target)
            if mode is not None:
                os.fchmod(fd, mode)
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


def temporary_beside(target: str) -> tuple[int, str]:
    """A new hidden file `.<name>.<random>.tmp` in `target`'s folder, open for writing:
    `(descriptor, path)`.

    It is created with mode 0666, so the kernel applies the umask (and a folder's
    default ACL) exactly as for `open`: a new checkpoint gets the usual permissions
    without reading the umask, which only `os.umask` can, by setting it for every
    thread of the process (`tempfile.mkstemp` would give 0600).
    """
    folder, base = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot save to {target!r}: no free temporary name in {folder!r}")


def _existing_mode(target: str) -> int | None:
    """The permissions of the file being overwritten (kept), or None for a new file."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return None


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
            header = json.loads(raw, object_pairs_hook=unique)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            raise self.corrupt(f"bad header, not safetensors JSON ({type(err).__name__})") from err
        if not isinstance(header, dict):
            raise self.corrupt("the header is not a JSON object")
        metadata = header.pop(METADATA_KEY, None)
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


def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
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
