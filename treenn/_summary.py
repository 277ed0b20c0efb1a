"""`treenn.summary`: a table of every array, its status and its module's mode."""

from __future__ import annotations

import math
from typing import Any

from ._modes import mode_of
from ._selectors import few
from ._status import Status, is_array_like, status_of, unmarked
from ._tree import check_model, dotted, is_mode_bearing, modules

_HEADER = ("path", "module", "shape", "dtype", "params", "status", "mode")


def _mode(module: Any) -> str:
    if module is None or not is_mode_bearing(module):
        return "-"
    inference, pinned = mode_of(module)
    # `jax.eval_shape` makes the mode bool itself abstract: say so, never guess.
    mode = "unknown" if inference is None else "eval" if inference else "train"
    return mode + " (pinned)" if pinned else mode


_PINNED_EVAL = "eval (pinned)"


def _array_status(leaf: Any) -> Status | None:
    status = status_of(leaf)
    if status is Status.STATIC and not is_array_like(leaf):
        return None  # not an array: no row
    return status


def rows(model: Any) -> list[tuple[str, str, str, str, int, str, str, int]]:
    """One row per array, plus one per mode-bearing module without arrays:
    `(path, module, shape, dtype, params, status, mode, bytes)`."""
    out = []
    for path, module, own in modules(model):
        kind = type(module).__name__ if module is not None else "-"
        mode = _mode(module)
        arrays = 0
        for leaf_path, leaf in own:
            status = _array_status(leaf)
            if status is None:
                continue
            arrays += 1
            array = unmarked(leaf)
            size = int(math.prod(array.shape))
            nbytes = size * array.dtype.itemsize  # PRNG key dtypes are no NumPy dtypes
            out.append(
                (
                    dotted(leaf_path),
                    kind,
                    str(tuple(array.shape)),
                    str(array.dtype),
                    size,
                    status.value,
                    mode,
                    nbytes,
                )
            )
        if arrays == 0 and mode != "-":
            out.append((dotted(path), kind, "-", "-", 0, "-", mode, 0))
    return out


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def summary(model: Any) -> str:
    """A table of the model: one row per array, then totals.

    **Arguments:**

    - `model`: a treenn or Equinox model.

    **Returns:** the table as a string: for each array its dotted path, module type,
    shape, dtype, parameter count, status (trainable / frozen / buffer; `static` for
    integer arrays) and its module's mode (train / eval, pinned); a row for each
    mode-bearing module that holds no array (Dropout); and the totals of trainable,
    frozen and buffer parameters and bytes.

    !!! Example

        ```python
        print(treenn.summary(treenn.freeze(model, "backbone.**")))
        ```
    """
    check_model(model, "treenn.summary")
    table = rows(model)
    lines = [tuple(str(c) for c in row[:7]) for row in table]
    widths = [max([len(h)] + [len(r[i]) for r in lines]) for i, h in enumerate(_HEADER)]
    numeric = {4}
    fmt = lambda r: "  ".join(  # noqa: E731
        c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
    ).rstrip()
    rule = "-" * len(fmt(tuple("-" * w for w in widths)))
    text = [fmt(_HEADER), rule] + [fmt(r) for r in lines] + [rule]
    totals = []
    for status in (Status.TRAINABLE, Status.FROZEN, Status.BUFFER, Status.STATIC):
        params = sum(r[4] for r in table if r[5] == status.value)
        nbytes = sum(r[7] for r in table if r[5] == status.value)
        if status is Status.STATIC and params == 0:
            continue
        totals.append(f"{status.value}: {params:,} params ({_bytes(nbytes)})")
    text.append("total " + " | ".join(totals))
    # Weights training under statistics pinned in eval: a recipe (frozen BatchNorm
    # statistics) or a forgotten `nn.unpin` after `unfreeze`; say it either way.
    held = sorted(
        {r[0].rpartition(".")[0] for r in table if r[6] == _PINNED_EVAL and r[5] == "trainable"}
    )
    if held:
        text.append(
            f"note: {len(held)} module(s) pinned in eval while their arrays train (their "
            f"statistics stay frozen): {few(held, 5)}; to train them in training mode too, "
            "`treenn.unfreeze(model, where, unpin=True)` or `nn.unpin(model, where)`"
        )
    return "\n".join(text)
