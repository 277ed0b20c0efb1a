"""`treenn.summary`: one row per array (plus mode-bearing modules without arrays) and
totals that agree with the model."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Net, summary_rows, summary_totals

import treenn
import treenn.nn as nn


class Mixed(treenn.Module):
    net: Net
    half: nn.Linear  # bfloat16: 2 bytes per parameter
    steps: jax.Array  # int32: never trainable

    def __init__(self, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.net = Net(key=k1)
        self.half = nn.Linear(4, 5, dtype=jnp.bfloat16, key=k2)
        self.steps = jnp.zeros((3,), jnp.int32)


def table(text: str) -> dict[str, dict[str, str]]:
    """The table part of a summary as {path: {column: cell}}."""
    return {row["path"]: row for row in summary_rows(text)}


def cells(model: Any) -> list[tuple[str, ...]]:
    """The printed rows of `treenn.summary(model)` as tuples of cells."""
    return [tuple(row.values()) for row in summary_rows(treenn.summary(model))]


def inexact_leaves(tree: Any) -> list[Any]:
    return [
        x
        for x in jax.tree_util.tree_leaves(tree)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)
    ]


def expected_totals(model: Mixed) -> dict[str, tuple[int, int]]:
    """Computed from the model without the summary code: trainable arrays from
    `treenn.trainable`, buffers are the BatchNorm statistics, the rest of the
    floating-point arrays are frozen."""
    train = inexact_leaves(treenn.trainable(model))
    bn = model.net.backbone.layers[1]
    buffers = [bn.running_mean, bn.running_var]
    every = inexact_leaves(model)
    size = lambda xs: sum(int(x.size) for x in xs)
    nbytes = lambda xs: sum(int(x.size) * x.dtype.itemsize for x in xs)
    return {
        "trainable": (size(train), nbytes(train)),
        "buffer": (size(buffers), nbytes(buffers)),
        "frozen": (
            size(every) - size(train) - size(buffers),
            nbytes(every) - nbytes(train) - nbytes(buffers),
        ),
    }


def test_rows_of_a_fresh_net(net: Net) -> None:
    assert cells(net) == [
        ("backbone.layers.0.weight", "Conv2d", "(4, 3, 3, 3)", "float32", "108", "trainable", "-"),
        ("backbone.layers.0.bias", "Conv2d", "(4,)", "float32", "4", "trainable", "-"),
        ("backbone.layers.1.weight", "BatchNorm", "(4,)", "float32", "4", "trainable", "train"),
        ("backbone.layers.1.bias", "BatchNorm", "(4,)", "float32", "4", "trainable", "train"),
        ("backbone.layers.1.running_mean", "BatchNorm", "(4,)", "float32", "4", "buffer", "train"),
        ("backbone.layers.1.running_var", "BatchNorm", "(4,)", "float32", "4", "buffer", "train"),
        ("backbone.layers.3", "Dropout", "-", "-", "0", "-", "train"),
        ("backbone.layers.4.weight", "Conv2d", "(4, 4, 3, 3)", "float32", "144", "trainable", "-"),
        ("backbone.layers.4.bias", "Conv2d", "(4,)", "float32", "4", "trainable", "-"),
        ("head.weight", "Linear", "(3, 4)", "float32", "12", "trainable", "-"),
        ("head.bias", "Linear", "(3,)", "float32", "3", "trainable", "-"),
    ]  # fmt: skip
    # 283 trainable float32 parameters (1,132 bytes, shown as 1.1 KiB) and 8 in buffers.
    shown = summary_totals(treenn.summary(net))
    assert shown.keys() == {"trainable", "frozen", "buffer"}
    assert shown["trainable"] == (283, pytest.approx(1132, abs=0.05 * 1024))
    assert shown["frozen"] == (0, 0.0)
    assert shown["buffer"] == (8, 32.0)


def test_a_line_per_array_in_the_order_of_statuses(net: Net) -> None:
    model = nn.eval_mode(treenn.freeze(net, "backbone.**"), nn.BatchNorm, pin=True)
    rows = summary_rows(treenn.summary(model))
    arrays = [(r["path"], r["status"]) for r in rows if r["shape"] != "-"]
    assert arrays == list(treenn.statuses(model).items())
    assert [r["path"] for r in rows if r["shape"] == "-"] == ["backbone.layers.3"]


def test_reflects_freeze_and_modes(net: Net) -> None:
    before = table(treenn.summary(net))
    assert before["backbone.layers.0.weight"]["status"] == "trainable"
    assert before["backbone.layers.1.weight"]["mode"] == "train"

    model = treenn.freeze(net, "backbone.**")
    model = nn.eval_mode(model, nn.BatchNorm, pin=True)
    model = nn.eval_mode(model, nn.Dropout)
    parsed = table(treenn.summary(model))
    for path in (
        "backbone.layers.0.weight",
        "backbone.layers.0.bias",
        "backbone.layers.1.weight",
        "backbone.layers.4.weight",
    ):
        assert parsed[path]["status"] == "frozen", path
    # Buffers stay buffers when frozen; the head stays trainable.
    assert parsed["backbone.layers.1.running_mean"]["status"] == "buffer"
    assert parsed["backbone.layers.1.running_var"]["status"] == "buffer"
    assert parsed["head.weight"]["status"] == "trainable"
    # Modes of each array's module, pins shown.
    for path in ("backbone.layers.1.weight", "backbone.layers.1.running_var"):
        assert parsed[path]["mode"] == "eval (pinned)"
    assert parsed["backbone.layers.3"] == {
        "path": "backbone.layers.3", "module": "Dropout", "shape": "-", "dtype": "-",
        "params": "0", "status": "-", "mode": "eval",
    }  # fmt: skip
    assert parsed["head.weight"]["mode"] == "-"
    # A later unpinned train_mode keeps the pinned BatchNorm in eval.
    parsed = table(treenn.summary(nn.train_mode(model)))
    assert parsed["backbone.layers.1.weight"]["mode"] == "eval (pinned)"
    assert parsed["backbone.layers.3"]["mode"] == "train"
    # BitFit: unfreeze one array only.
    parsed = table(treenn.summary(treenn.unfreeze(model, "backbone.layers.0.bias")))
    assert parsed["backbone.layers.0.bias"]["status"] == "trainable"
    assert parsed["backbone.layers.0.weight"]["status"] == "frozen"


@pytest.mark.parametrize("frozen", [None, "net.backbone.**", "half"])
def test_totals_match_the_model(key: jax.Array, frozen: str | None) -> None:
    model = Mixed(key=key)
    if frozen is not None:
        model = treenn.freeze(model, frozen)
    want = expected_totals(model)
    rows = summary_rows(treenn.summary(model))
    for status, (params, _) in want.items():
        assert sum(int(r["params"]) for r in rows if r["status"] == status) == params, status
    shown = summary_totals(treenn.summary(model))
    for status, (params, nbytes) in want.items():
        got_params, got_bytes = shown[status]
        assert got_params == params, status
        # Shown to one decimal in KiB above 1 KiB.
        assert got_bytes == pytest.approx(nbytes, abs=0.05 * 1024 if nbytes >= 1024 else 0), status
    # The int32 array is never counted as trainable or frozen.
    steps = [r for r in rows if r["path"] == "steps"]
    assert len(steps) == 1 and steps[0]["status"] not in ("trainable", "frozen", "buffer")
    assert steps[0]["params"] == "3" and steps[0]["dtype"] == "int32"


def test_bfloat16_rows_count_two_bytes(key: jax.Array) -> None:
    model = Mixed(key=key)
    half = table(treenn.summary(model))["half.weight"]
    assert (half["shape"], half["dtype"], half["params"]) == ("(5, 4)", "bfloat16", "20")
    assert summary_totals(treenn.summary(model.half))["trainable"] == (25, 50.0)


def test_totals_exact_bytes_for_small_model(key: jax.Array) -> None:
    """Below 1 KiB the byte counts are shown exactly."""
    model = nn.Sequential(nn.Linear(3, 4, key=key), nn.BatchNorm(4), nn.Dropout(0.5))
    model = treenn.freeze(model, "layers.0.weight")
    # Trainable: Linear bias 4 + BN weight/bias 8 = 12 params; frozen: 12; buffers: 8.
    assert summary_totals(treenn.summary(model)) == {
        "trainable": (12, 48.0),
        "frozen": (12, 48.0),
        "buffer": (8, 32.0),
    }


def test_root_module_rows(key: jax.Array) -> None:
    bn = nn.eval_mode(nn.BatchNorm(3), pin=True)
    assert cells(bn) == [
        ("weight", "BatchNorm", "(3,)", "float32", "3", "trainable", "eval (pinned)"),
        ("bias", "BatchNorm", "(3,)", "float32", "3", "trainable", "eval (pinned)"),
        ("running_mean", "BatchNorm", "(3,)", "float32", "3", "buffer", "eval (pinned)"),
        ("running_var", "BatchNorm", "(3,)", "float32", "3", "buffer", "eval (pinned)"),
    ]


def test_plain_equinox_mlp(key: jax.Array) -> None:
    mlp = eqx.nn.MLP(2, 3, 4, 1, key=key)
    assert cells(mlp) == [
        ("layers.0.weight", "Linear", "(4, 2)", "float32", "8", "trainable", "-"),
        ("layers.0.bias", "Linear", "(4,)", "float32", "4", "trainable", "-"),
        ("layers.1.weight", "Linear", "(3, 4)", "float32", "12", "trainable", "-"),
        ("layers.1.bias", "Linear", "(3,)", "float32", "3", "trainable", "-"),
    ]
    frozen = treenn.freeze(mlp, "layers.1")
    shown = summary_totals(treenn.summary(frozen))
    assert shown["trainable"] == (12, 48.0)
    assert shown["frozen"] == (15, 60.0)


def test_equinox_layers_inside_user_module(eqx_user: Any, key: jax.Array) -> None:
    parsed = table(treenn.summary(eqx_user))
    assert parsed["drop"]["module"] == "Dropout"
    assert parsed["drop"]["mode"] == "train"
    assert parsed["mlp.layers.0.weight"]["shape"] == "(8, 3)"
    parsed = table(treenn.summary(treenn.freeze(nn.eval_mode(eqx_user), "mlp")))
    assert parsed["drop"]["mode"] == "eval"
    assert all(parsed[p]["status"] == "frozen" for p in parsed if p.startswith("mlp."))

    class WithBN(eqx.Module):
        bn: eqx.nn.BatchNorm

    bn, _ = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    parsed = table(treenn.summary(WithBN(bn)))
    assert parsed["bn.weight"]["module"] == "BatchNorm"
    assert parsed["bn.weight"]["mode"] == "train"
    parsed = table(treenn.summary(nn.eval_mode(WithBN(bn))))
    assert parsed["bn.bias"]["mode"] == "eval"


def test_summary_of_frozen_model_is_unchanged_by_jit(net: Net) -> None:
    """Statuses live in the model, so a model returned from jit shows the same table."""
    model = treenn.freeze(net, "head")
    out = treenn.jit(lambda m: m)(model)
    assert treenn.summary(out) == treenn.summary(model)
    assert np.array_equal(np.asarray(out.head.weight), np.asarray(model.head.weight))


def test_summary_shows_trainable_weights_under_pinned_eval_statistics(net: Net) -> None:
    """Issue 13 (5): after `unfreeze` without `unpin=True`, a BatchNorm's weights train
    while it stays pinned in eval; the summary says so in a note (and not otherwise)."""
    frozen = treenn.freeze_backbone(net, "head")
    assert "note:" not in treenn.summary(frozen)
    kept = treenn.unfreeze(frozen, "backbone.layers.1")
    text = treenn.summary(kept)
    assert "note: 1 module(s) pinned in eval while their arrays train" in text
    assert "'backbone.layers.1'" in text.split("note:")[1]
    assert "unpin=True" in text
    assert "note:" not in treenn.summary(treenn.unfreeze(frozen, "backbone.layers.1", unpin=True))
