"""`treenn.summary`: one row per array (plus mode-bearing modules without arrays) and
totals that agree with the model."""

from __future__ import annotations

import re
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Net

import treenn
import treenn.nn as nn
from treenn._summary import rows  # private on purpose: the table summary() prints, as numbers

COLUMNS = ("path", "module", "shape", "dtype", "params", "status", "mode")


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
    """Parse the table part of a summary into {path: {column: cell}}."""
    lines = text.splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == list(COLUMNS)
    out = {}
    for line in lines[1:]:
        if set(line.strip()) <= {"-"} or line.startswith("total"):
            continue
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(COLUMNS), line
        out[cells[0]] = dict(zip(COLUMNS, cells))
    return out


def totals(text: str) -> dict[str, tuple[int, float]]:
    """Parse the totals line into {status: (params, bytes)} (bytes to the shown precision)."""
    line = [ln for ln in text.splitlines() if ln.startswith("total")]
    assert len(line) == 1
    out = {}
    for status, params, amount, unit in re.findall(
        r"(\w+): ([\d,]+) params \(([\d.]+) (B|KiB|MiB|GiB)\)", line[0]
    ):
        scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
        out[status] = (int(params.replace(",", "")), float(amount) * scale)
    return out


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
    assert rows(net) == [
        (
            "backbone.layers.0.weight",
            "Conv2d",
            "(4, 3, 3, 3)",
            "float32",
            108,
            "trainable",
            "-",
            432,
        ),
        ("backbone.layers.0.bias", "Conv2d", "(4,)", "float32", 4, "trainable", "-", 16),
        ("backbone.layers.1.weight", "BatchNorm", "(4,)", "float32", 4, "trainable", "train", 16),
        ("backbone.layers.1.bias", "BatchNorm", "(4,)", "float32", 4, "trainable", "train", 16),
        (
            "backbone.layers.1.running_mean",
            "BatchNorm",
            "(4,)",
            "float32",
            4,
            "buffer",
            "train",
            16,
        ),
        ("backbone.layers.1.running_var", "BatchNorm", "(4,)", "float32", 4, "buffer", "train", 16),
        ("backbone.layers.3", "Dropout", "-", "-", 0, "-", "train", 0),
        (
            "backbone.layers.4.weight",
            "Conv2d",
            "(4, 4, 3, 3)",
            "float32",
            144,
            "trainable",
            "-",
            576,
        ),
        ("backbone.layers.4.bias", "Conv2d", "(4,)", "float32", 4, "trainable", "-", 16),
        ("head.weight", "Linear", "(3, 4)", "float32", 12, "trainable", "-", 48),
        ("head.bias", "Linear", "(3,)", "float32", 3, "trainable", "-", 12),
    ]


def test_string_has_a_line_per_row(net: Net) -> None:
    model = nn.eval_mode(treenn.freeze(net, "backbone.**"), nn.BatchNorm, pin=True)
    text = treenn.summary(model)
    assert isinstance(text, str)
    parsed = table(text)
    expected = rows(model)
    assert list(parsed) == [r[0] for r in expected]  # one line per row, in order
    for row in expected:
        assert tuple(parsed[row[0]].values()) == tuple(str(c) for c in row[:7])


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
    table_rows = rows(model)
    for status, (params, nbytes) in want.items():
        assert sum(r[4] for r in table_rows if r[5] == status) == params, status
        assert sum(r[7] for r in table_rows if r[5] == status) == nbytes, status
    shown = totals(treenn.summary(model))
    for status, (params, nbytes) in want.items():
        got_params, got_bytes = shown[status]
        assert got_params == params, status
        # Shown to one decimal in KiB above 1 KiB.
        assert got_bytes == pytest.approx(nbytes, abs=0.05 * 1024 if nbytes >= 1024 else 0), status
    # The int32 array is never counted as trainable or frozen.
    steps = [r for r in table_rows if r[0] == "steps"]
    assert len(steps) == 1 and steps[0][5] not in ("trainable", "frozen", "buffer")
    assert steps[0][4] == 3 and steps[0][3] == "int32"


def test_bfloat16_rows_count_two_bytes(key: jax.Array) -> None:
    model = Mixed(key=key)
    by_path = {r[0]: r for r in rows(model)}
    assert by_path["half.weight"][2:5] == ("(5, 4)", "bfloat16", 20)
    assert by_path["half.weight"][7] == 40
    assert by_path["half.bias"][7] == 10


def test_totals_exact_bytes_for_small_model(key: jax.Array) -> None:
    """Below 1 KiB the byte counts are shown exactly."""
    model = nn.Sequential(nn.Linear(3, 4, key=key), nn.BatchNorm(4), nn.Dropout(0.5))
    model = treenn.freeze(model, "layers.0.weight")
    # Trainable: Linear bias 4 + BN weight/bias 8 = 12 params; frozen: 12; buffers: 8.
    assert totals(treenn.summary(model)) == {
        "trainable": (12, 48.0),
        "frozen": (12, 48.0),
        "buffer": (8, 32.0),
    }


def test_root_module_rows(key: jax.Array) -> None:
    bn = nn.eval_mode(nn.BatchNorm(3), pin=True)
    assert [r[:7] for r in rows(bn)] == [
        ("weight", "BatchNorm", "(3,)", "float32", 3, "trainable", "eval (pinned)"),
        ("bias", "BatchNorm", "(3,)", "float32", 3, "trainable", "eval (pinned)"),
        ("running_mean", "BatchNorm", "(3,)", "float32", 3, "buffer", "eval (pinned)"),
        ("running_var", "BatchNorm", "(3,)", "float32", 3, "buffer", "eval (pinned)"),
    ]


def test_plain_equinox_mlp(key: jax.Array) -> None:
    mlp = eqx.nn.MLP(2, 3, 4, 1, key=key)
    assert [r[:7] for r in rows(mlp)] == [
        ("layers.0.weight", "Linear", "(4, 2)", "float32", 8, "trainable", "-"),
        ("layers.0.bias", "Linear", "(4,)", "float32", 4, "trainable", "-"),
        ("layers.1.weight", "Linear", "(3, 4)", "float32", 12, "trainable", "-"),
        ("layers.1.bias", "Linear", "(3,)", "float32", 3, "trainable", "-"),
    ]
    frozen = treenn.freeze(mlp, "layers.1")
    shown = totals(treenn.summary(frozen))
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
