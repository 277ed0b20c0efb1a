"""Checkpoints: `treenn.save`, `treenn.load`, `treenn.load_pretrained` and
`treenn.load_trainable`, in the safetensors format.

Arrays are stored under their PyTorch-style dotted paths, so a checkpoint is readable by
any safetensors reader (and a PyTorch state dict maps onto it by name). Frozen status,
modes, pins, PRNG key types and Python `int`/`float`/`bool` leaves go in the header's
metadata, as treenn's own JSON with a CRC. The container (validation, atomic streamed
writes) is `_safetensors`; the way every loader puts arrays into a model is `_fill`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import zlib
from typing import Any, TypeVar

import jax

from ._edit import each_mode_bearing, fit_classes
from ._fill import (
    LoadReport,
    array_slots,
    check_filled,
    describe,
    fill,
    has_mode,
    is_abstract,
    is_key_dtype,
    is_slot,
    layout,
    modal,
    mode_paths,
    settle_modes,
)
from ._modes import mode_of, with_mode
from ._safetensors import (
    METADATA_KEY,
    CheckpointError,
    PathLike,
    SafetensorsFile,
    dtype_code,
    reserved_name,
    unique,
    write_safetensors,
)
from ._selectors import few
from ._status import Buffer, Frozen, Status, is_array_leaf, is_inexact, status_of, unmarked
from ._tree import (
    check_model,
    dotted,
    flatten,
    modules,
    unflatten,
)

T = TypeVar("T")

# treenn-2 adds Python scalar leaves; treenn-1 files (without them) still load.
_FORMAT = "treenn-2"
_FORMATS = ("treenn-1", "treenn-2")


def _is_scalar(leaf: Any) -> bool:
    return type(leaf) in (bool, int, float)


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
    modes_at = mode_paths(model)
    arrays: dict[str, Any] = {}
    frozen, buffers, keys, scalars = [], [], {}, {}
    for key_path, leaf in zip(paths, leaves):
        name = dotted(key_path)
        if _is_scalar(leaf) and name not in modes_at:
            if name in scalars:
                raise CheckpointError(f"cannot save: two leaves share the path {name!r}")
            scalars[name] = _scalar_record(leaf)
            continue
        if not is_array_leaf(leaf):
            continue
        if name in arrays:
            raise CheckpointError(f"cannot save: two arrays share the path {name!r}")
        if name == METADATA_KEY:
            raise CheckpointError(reserved_name(name))
        array = unmarked(leaf)
        if isinstance(array, jax.core.Tracer):
            raise CheckpointError(
                f"cannot save {name!r}: it is a traced value (treenn.save was called inside "
                "jit, grad, vmap...); save the model the transformed function returns"
            )
        if is_key_dtype(array.dtype):
            keys[name] = layout(array)[2]
            array = jax.random.key_data(array)
        dtype_code(name, array.dtype)
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
    for p, module in modal(model):
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
    def of(cls, paths: list[Any], leaves: list[Any], modes_at: set[str]) -> _Slots:
        arrays, scalars = {}, {}
        for p, leaf in zip(paths, leaves):
            if not (_is_scalar(leaf) or is_slot(leaf)):
                continue
            name = dotted(p)
            if name in modes_at:
                continue  # `inference`: the metadata's modes restore it
            if _is_scalar(leaf):
                scalars[name] = leaf
            else:
                arrays[name] = leaf
        return cls(arrays, scalars)


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
        slots = _Slots.of(paths, leaves, mode_paths(like))
        scalars = _check_fit(file, meta, slots)
        # A set: the metadata lists the frozen paths, and a list's `in` made loading
        # quadratic in their number (24,000 tiny frozen arrays: 5.2 s, 1.7 s unfrozen).
        frozen = None if meta is None else frozenset(meta["frozen"])
        new = []
        for p, leaf in zip(paths, leaves):
            name = dotted(p)
            if name in scalars:
                new.append(scalars[name])
            elif slots.arrays.get(name) is leaf:
                new.append(_fill_from_file(file, frozen, name, leaf))
            else:
                new.append(leaf)
    check_filled("treenn.load", file.label, array_slots(like, paths, leaves), new)
    model = fit_classes(unflatten(treedef, new))
    return _restore_modes(file, model, meta["modes"]) if meta else model


def _fill_from_file(
    file: SafetensorsFile, frozen: frozenset[str] | None, name: str, leaf: Any
) -> Any:
    """The array `name` of the file, with the status the file gives it (`frozen`: the
    metadata's frozen paths; `None` for a foreign file, whose arrays take `leaf`'s)."""
    impl = layout(leaf)[2]
    if frozen is None:
        return fill(leaf, file.read(name), impl=impl)
    if type(leaf) is Buffer:
        mark: Any = Buffer
    elif name in frozen:
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
        meta = json.loads(metadata["treenn"], object_pairs_hook=unique)
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


def _restore_modes(file: SafetensorsFile, model: Any, modes: dict[str, dict[str, bool]]) -> Any:
    """The file's modes and pins on the model's mode-bearing modules, which must be the
    file's: a name that matches nothing is an error."""
    seen = set()

    def restore(p: Any, module: Any) -> Any:
        if not has_mode(module):
            return module
        name = dotted(p)
        seen.add(name)
        if name not in modes:
            return module
        return with_mode(module, modes[name]["inference"], modes[name]["pinned"])

    model = each_mode_bearing(model, restore)
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


def load_trainable(path: PathLike, model: T) -> T:
    """Load a checkpoint of trainable arrays only (`treenn.save(path,
    treenn.trainable(model))`: LoRA adapters and a head, a few hundred kilobytes) onto
    `model`, whose other arrays (the frozen base) come from elsewhere.

    It is `treenn.combine(treenn.load(path, treenn.trainable(model)),
    treenn.partition(model)[1])`: `model` must have the same trainable set as the saved
    one (adapt it with the same `treenn.lora` call, freeze the same arrays); a
    difference raises `treenn.load`'s error naming the paths.

    **Arguments:**

    - `path`: the file written by `treenn.save(path, treenn.trainable(model))`.
    - `model`: the model to load onto, with its base weights already loaded.

    **Returns:** `model` with its trainable arrays from the file. Raises
    `CheckpointError` naming the paths when the file's arrays are not `model`'s
    trainable ones.

    !!! Example

        ```python
        treenn.save("adapters.eqx", treenn.trainable(model))      # kilobytes
        base = treenn.load_torch("vit.pth", vit)                     # the frozen base
        model = treenn.lora(treenn.freeze(base), "**.qkv", rank=8, key=key)
        model = treenn.load_trainable("adapters.eqx", model)
        ```
    """
    from ._transforms import combine, partition

    check_model(model, "treenn.load_trainable")
    params, rest = partition(model)
    loaded = load(path, params)
    # `load` gives `params`' structure back; compared as structures (node types and
    # static fields), never as printed text: a repr can differ between equal
    # structures, raise, or coincide for different ones (an Equinox class and its
    # mark-reading subclass print alike).
    wanted, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_none)
    got, got_def = jax.tree_util.tree_flatten(loaded, is_leaf=_is_none)
    if got_def != treedef:  # type: ignore[operator]  # (jaxlib types PyTreeDef oddly)
        raise CheckpointError(
            f"treenn.load_trainable: {os.fspath(path)!r} loaded into a structure other "
            f"than the model's trainable arrays: {_difference(loaded, params)}"
        )
    # Keep only the trainable arrays: what else `load` fills, `rest` holds already.
    kept = [g if w is not None else None for w, g in zip(wanted, got)]
    return combine(jax.tree_util.tree_unflatten(treedef, kept), rest)


def _is_none(x: Any) -> bool:
    return x is None


def _difference(loaded: Any, params: Any) -> str:
    """Where two structures first differ, by path; classes by their full names, and
    said outright when two different classes share one."""
    from ._transforms import structure_mismatch

    for (p, a, _), (_, b, _) in zip(modules(loaded), modules(params)):
        kind_a, kind_b = type(a), type(b)
        name_a, name_b = _full_name(kind_a), _full_name(kind_b)
        if kind_a is not kind_b and name_a == name_b:
            return f"at {dotted(p)!r}: two different classes named {name_a}"
    return structure_mismatch(loaded, params, "the loaded arrays", "the model")


def _full_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"
