"""Selectors: the one meaning of every `where=` argument (API.md section 2).

Selectors are exercised through the helpers that take them (`treenn.freeze`,
`nn.eval_mode`, ...) and directly through `treenn._selectors.select` / `glob_regex`.
"""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest
from conftest import NET_BUFFERS, NET_PARAMS, Net, paths_with

import treenn
from treenn import nn
from treenn._selectors import glob_regex, select  # private on purpose: the selector engine itself

# -- helpers --------------------------------------------------------------------------


def frozen_paths(model):
    return paths_with(model, "frozen")


def trainable_paths(model):
    return paths_with(model, "trainable")


def covered(where, model):
    """The dotted array paths of `model` a selector covers."""
    selection = select(where, model)
    paths = list(treenn.statuses(model))  # every array's dotted path
    if selection is None:
        return set(paths)
    return {p for p in paths if selection.covers(p)}


class Tricky(treenn.Module):
    """Names chosen to catch globs that match partial components."""

    bias: jax.Array
    bias_extra: jax.Array
    layer1: nn.Linear
    layers: tuple[nn.Linear, ...]
    mylayer: nn.Linear

    def __init__(self, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.bias = jnp.zeros((2,))
        self.bias_extra = jnp.zeros((2,))
        self.layer1 = nn.Linear(2, 2, key=k1)
        self.layers = (nn.Linear(2, 2, key=k2),)
        self.mylayer = nn.Linear(2, 2, key=k3)


class Containers(treenn.Module):
    """Submodules and arrays inside lists, dicts and tuples."""

    blocks: list
    heads: dict
    extra: tuple
    drops: dict

    def __init__(self, *, key):
        keys = jax.random.split(key, 12)
        self.blocks = [nn.Linear(2, 2, key=keys[i]) for i in range(11)]
        self.heads = {"enc": nn.Linear(2, 2, key=keys[11]), "dec": nn.Linear(2, 2, key=keys[0])}
        self.extra = (jnp.ones((2,)), jnp.arange(3))
        self.drops = {"a": [nn.Dropout(0.1), nn.Dropout(0.2)]}


class Outer(treenn.Module):
    """A Net nested one level down, to check class selectors at depth."""

    inner: Net
    proj: nn.Linear

    def __init__(self, *, key):
        k1, k2 = jax.random.split(key)
        self.inner = Net(key=k1)
        self.proj = nn.Linear(3, 2, key=k2)


@pytest.fixture
def tricky(key):
    return Tricky(key=key)


@pytest.fixture
def containers(key):
    return Containers(key=key)


# -- string globs: the matching rules -------------------------------------------------

GLOB_CASES = [
    # exact paths
    ("head.weight", "head.weight", True),
    ("head.weight", "head.bias", False),
    ("head.weight", "head", False),  # selecting a child does not select its parent
    ("head.weight", "head.weightx", False),
    ("head", "head.weight", True),  # selecting a module selects everything inside it
    ("head", "header.weight", False),
    ("blocks.1", "blocks.1.weight", True),
    ("blocks.1", "blocks.10.weight", False),
    ("heads.dec", "heads.dec.bias", True),
    # `*`: exactly one component
    ("*", "head", True),
    ("*", "head.weight", True),
    ("*", "", False),
    ("*.weight", "head.weight", True),
    ("*.weight", "backbone.layers.0.weight", False),
    ("backbone.layers.*.bias", "backbone.layers.4.bias", True),
    ("backbone.layers.*.bias", "backbone.layers.4.weight", False),
    ("backbone.*.bias", "backbone.layers.4.bias", False),
    # `*` inside a component
    ("layer*", "layers.0.weight", True),
    ("layer*", "layer1.weight", True),
    ("layer*", "layer.weight", True),
    ("layer*", "mylayer.weight", False),
    ("*layer", "mylayer.weight", True),
    ("*layer", "layers.0.weight", False),
    ("l*s.0", "layers.0.bias", True),
    ("l*s.0", "layers.1.bias", False),
    ("running_*", "running_mean", True),
    # `**`: zero or more components, at the start, middle and end
    ("**.bias", "bias", True),
    ("**.bias", "head.bias", True),
    ("**.bias", "backbone.layers.0.bias", True),
    ("**.bias", "bias_extra", False),
    ("**.bias", "head.bias_extra", False),
    ("**.bias", "head.xbias", False),
    ("**.bias", "head.weight", False),
    ("backbone.**", "backbone", True),
    ("backbone.**", "backbone.layers.0.weight", True),
    ("backbone.**", "backbone2.layers.0.weight", False),
    ("backbone.**", "head.weight", False),
    ("a.**.b", "a.b", True),
    ("a.**.b", "a.x.b", True),
    ("a.**.b", "a.x.y.b", True),
    ("a.**.b", "a.x.y.b.c", True),
    ("a.**.b", "a.x.c", False),
    ("a.**.b", "x.a.b", False),
    ("a.**.b", "a.bb", False),
    ("**", "", True),
    ("**", "anything.at.all", True),
    ("**.layers.*.bias", "backbone.layers.0.bias", True),
    ("**.layers.*.bias", "backbone.layers.0.weight", False),
]


@pytest.mark.parametrize(("pattern", "path", "expected"), GLOB_CASES)
def test_glob_matching_rules(pattern, path, expected, net):
    selection = select(pattern, net)
    assert selection.covers(path) is expected
    # `glob_regex` is documented as matched against `path + "."`.
    assert (glob_regex(pattern).match(path + ".") is not None) is expected


def test_glob_selects_only_whole_components_in_a_model(tricky):
    assert covered("**.bias", tricky) == {
        "bias",
        "layer1.bias",
        "layers.0.bias",
        "mylayer.bias",
    }
    assert covered("layer*", tricky) == {
        "layer1.weight",
        "layer1.bias",
        "layers.0.weight",
        "layers.0.bias",
    }
    frozen = treenn.freeze(tricky, "**.bias")
    assert "bias_extra" not in frozen_paths(frozen)
    assert frozen_paths(frozen) == {"bias", "layer1.bias", "layers.0.bias", "mylayer.bias"}


def test_string_selectors_through_freeze(net):
    assert frozen_paths(treenn.freeze(net, "head.weight")) == {"head.weight"}
    assert frozen_paths(treenn.freeze(net, "head")) == {"head.weight", "head.bias"}
    assert frozen_paths(treenn.freeze(net, "backbone.layers.*.bias")) == {
        "backbone.layers.0.bias",
        "backbone.layers.1.bias",
        "backbone.layers.4.bias",
    }
    assert frozen_paths(treenn.freeze(net, "backbone.**")) == NET_PARAMS - {
        "head.weight",
        "head.bias",
    }
    assert frozen_paths(treenn.freeze(net, "**")) == NET_PARAMS
    assert frozen_paths(treenn.freeze(net, "**.layers.4.**")) == {
        "backbone.layers.4.weight",
        "backbone.layers.4.bias",
    }


def test_string_selectors_through_modes(net):
    assert nn.modes(nn.eval_mode(net, "backbone.layers.3")) == {
        "backbone.layers.1": False,
        "backbone.layers.3": True,
    }
    assert nn.modes(nn.eval_mode(net, "backbone.**")) == {
        "backbone.layers.1": True,
        "backbone.layers.3": True,
    }


# -- None -----------------------------------------------------------------------------


def test_none_selects_the_whole_model(net):
    assert select(None, net) is None
    assert covered(None, net) == NET_PARAMS | NET_BUFFERS
    assert frozen_paths(treenn.freeze(net, None)) == NET_PARAMS
    assert set(nn.modes(nn.eval_mode(net, None)).values()) == {True}


@pytest.mark.parametrize(
    "model",
    [
        nn.Dropout(0.5),  # no arrays at all
        nn.Lambda(jax.nn.relu),  # no leaves at all
        nn.BatchNorm(2, affine=False),  # buffers only
        {"count": jnp.arange(3)},  # integer array only
        (),  # empty tree
    ],
    ids=["dropout", "lambda", "buffers-only", "int-only", "empty"],
)
def test_where_none_never_errors_on_models_without_parameters(model):
    assert eqx.tree_equal(treenn.freeze(model), model)
    assert eqx.tree_equal(treenn.unfreeze(model), model)
    assert trainable_paths(treenn.freeze(model)) == set()


def test_where_none_never_errors_on_models_without_mode_bearing_modules(key):
    for model in (nn.Linear(2, 3, key=key), nn.Lambda(jax.nn.relu), (), {"w": jnp.ones((2,))}):
        assert nn.modes(model) == {}
        assert eqx.tree_equal(nn.eval_mode(model), model)
        assert eqx.tree_equal(nn.train_mode(model), model)
        assert eqx.tree_equal(nn.unpin(model), model)


# -- classes --------------------------------------------------------------------------


def test_class_selector_at_any_depth(net, key):
    assert frozen_paths(treenn.freeze(net, nn.Conv2d)) == {
        "backbone.layers.0.weight",
        "backbone.layers.0.bias",
        "backbone.layers.4.weight",
        "backbone.layers.4.bias",
    }
    outer = Outer(key=key)
    # `Net` sits at depth one inside `Outer`: everything in it, nothing outside it.
    assert frozen_paths(treenn.freeze(outer, Net)) == {"inner." + p for p in NET_PARAMS}
    assert frozen_paths(treenn.freeze(outer, nn.Linear)) == {
        "inner.head.weight",
        "inner.head.bias",
        "proj.weight",
        "proj.bias",
    }


def test_class_selector_matches_the_root(net, key):
    assert frozen_paths(treenn.freeze(net, Net)) == NET_PARAMS
    assert select(Net, net).covers("")
    bn = nn.BatchNorm(2)
    assert nn.modes(nn.eval_mode(bn, nn.BatchNorm)) == {"": True}
    linear = nn.Linear(2, 2, key=key)
    assert frozen_paths(treenn.freeze(linear, nn.Linear)) == {"weight", "bias"}
    # A base class selects its subclasses: every module here is an eqx.Module.
    assert frozen_paths(treenn.freeze(net, eqx.Module)) == NET_PARAMS


def test_tuple_of_classes(net):
    assert frozen_paths(treenn.freeze(net, (nn.Linear, nn.BatchNorm))) == {
        "backbone.layers.1.weight",
        "backbone.layers.1.bias",
        "head.weight",
        "head.bias",
    }
    assert nn.modes(nn.eval_mode(net, (nn.Dropout, nn.LayerNorm))) == {
        "backbone.layers.1": False,
        "backbone.layers.3": True,
    }


def test_class_selector_matching_nothing_names_the_class(net):
    with pytest.raises(ValueError, match=r"where=LayerNorm matches no"):
        treenn.freeze(net, nn.LayerNorm)
    # Lambda is in the model but holds no array.
    with pytest.raises(ValueError, match=re.escape("where=(LayerNorm, Lambda) matches no")):
        treenn.freeze(net, (nn.LayerNorm, nn.Lambda))
    with pytest.raises(ValueError, match=r"where=Linear matches no mode-bearing"):
        nn.eval_mode(net, nn.Linear)


# -- getters --------------------------------------------------------------------------


def test_getter_returning_one_module(net):
    assert frozen_paths(treenn.freeze(net, lambda m: m.head)) == {"head.weight", "head.bias"}
    assert frozen_paths(treenn.freeze(net, lambda m: m.backbone[0])) == {
        "backbone.layers.0.weight",
        "backbone.layers.0.bias",
    }
    assert nn.modes(nn.eval_mode(net, lambda m: m.backbone.layers[1])) == {
        "backbone.layers.1": True,
        "backbone.layers.3": False,
    }


def test_getter_returning_a_sequence_of_nodes(net):
    where = lambda m: (m.backbone.layers[0], m.head.bias)
    assert frozen_paths(treenn.freeze(net, where)) == {
        "backbone.layers.0.weight",
        "backbone.layers.0.bias",
        "head.bias",
    }
    where_list = lambda m: [m.head.weight, m.backbone.layers[4].bias]
    assert frozen_paths(treenn.freeze(net, where_list)) == {
        "head.weight",
        "backbone.layers.4.bias",
    }


def test_getter_returning_an_array_leaf(net):
    assert frozen_paths(treenn.freeze(net, lambda m: m.head.bias)) == {"head.bias"}
    assert covered(lambda m: m.backbone.layers[1].weight, net) == {"backbone.layers.1.weight"}


def test_getter_returning_a_frozen_array_leaf(net):
    frozen = treenn.freeze(net)
    # BitFit with a getter: the selected leaves are frozen (stored inside a mark).
    bitfit = treenn.unfreeze(frozen, lambda m: (m.head.bias, m.backbone.layers[0].bias))
    assert trainable_paths(bitfit) == {"head.bias", "backbone.layers.0.bias"}
    assert frozen_paths(bitfit) == NET_PARAMS - {"head.bias", "backbone.layers.0.bias"}
    # ... and a single frozen leaf in a module, selected again after a partial unfreeze.
    refrozen = treenn.freeze(bitfit, lambda m: m.head.bias)
    assert trainable_paths(refrozen) == {"backbone.layers.0.bias"}


def test_getter_returning_the_root(net):
    assert frozen_paths(treenn.freeze(net, lambda m: m)) == NET_PARAMS
    assert select(lambda m: m, net).covers("")


def test_getter_returning_nodes_inside_lists_and_dicts(containers):
    assert frozen_paths(treenn.freeze(containers, lambda m: m.blocks[1])) == {
        "blocks.1.weight",
        "blocks.1.bias",
    }
    assert frozen_paths(treenn.freeze(containers, lambda m: m.heads["dec"].weight)) == {
        "heads.dec.weight"
    }
    assert frozen_paths(treenn.freeze(containers, lambda m: m.extra[0])) == {"extra.0"}
    assert nn.modes(nn.eval_mode(containers, lambda m: m.drops["a"][1])) == {
        "drops.a.0": False,
        "drops.a.1": True,
    }
    # A container node itself: the dict of heads.
    assert frozen_paths(treenn.freeze(containers, lambda m: m.heads)) == {
        "heads.enc.weight",
        "heads.enc.bias",
        "heads.dec.weight",
        "heads.dec.bias",
    }


def test_getter_returning_a_frozen_leaf_inside_a_tuple(containers):
    # A frozen array stored in a plain tuple is not unwrapped by attribute access:
    # the getter sees the mark itself, and must still resolve to the array's path.
    frozen = treenn.freeze(containers, "extra")
    assert frozen_paths(frozen) == {"extra.0"}
    thawed = treenn.unfreeze(frozen, lambda m: m.extra[0])
    assert frozen_paths(thawed) == set()


def test_getter_returning_something_not_in_the_model(net, key):
    with pytest.raises(ValueError, match=r"where=<getter .*<lambda>> returned .*not a node"):
        treenn.freeze(net, lambda m: nn.Linear(4, 3, key=key))
    with pytest.raises(ValueError, match=r"where=<getter .*<lambda>> returned .*not a node"):
        treenn.freeze(net, lambda m: jnp.zeros((3,)))
    # A static field's value is not a node of the pytree.
    with pytest.raises(
        ValueError, match=r"where=<getter .*<lambda>> returned 4, which is not a node"
    ):
        treenn.freeze(net, lambda m: m.head.in_features)
    # The same in a sequence alongside a real node.
    with pytest.raises(ValueError, match=r"not a node"):
        nn.eval_mode(net, lambda m: (m.backbone.layers[1], nn.Dropout(0.1)))


def test_getter_returning_nothing(net):
    with pytest.raises(ValueError, match=r"where=<getter .*<lambda>> returned no node"):
        treenn.freeze(net, lambda m: ())


def test_getter_that_raises_is_named(net):
    def broken_getter(model):
        return model.no_such_layer

    with pytest.raises(ValueError, match=r"where=<getter .*broken_getter> failed.*AttributeError"):
        treenn.freeze(net, broken_getter)
    with pytest.raises(ValueError, match=r"broken_getter"):
        nn.eval_mode(net, broken_getter)
    with pytest.raises(ValueError, match=r"broken_getter"):
        select(broken_getter, net)


# -- invalid selectors ----------------------------------------------------------------

BAD_PATTERNS = ["a..b", "a[0]", "a?b", "a**b", "", ".a", "a.", "**x", "a b", "a|b"]


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_invalid_glob_syntax_names_the_pattern(pattern, net):
    message = re.escape(f"where={pattern!r}")
    with pytest.raises(ValueError, match=message):
        glob_regex(pattern)
    with pytest.raises(ValueError, match=message):
        treenn.freeze(net, pattern)
    with pytest.raises(ValueError, match=message):
        nn.eval_mode(net, pattern)


@pytest.mark.parametrize(
    "where",
    [3, 2.5, b"head", [nn.Linear], (), (nn.Linear, "head"), {"head": True}],
    ids=["int", "float", "bytes", "list", "empty-tuple", "mixed-tuple", "dict"],
)
def test_wrong_selector_type_is_a_type_error(where, net):
    with pytest.raises(TypeError, match=r"where=.* is not a selector"):
        select(where, net)
    with pytest.raises(TypeError, match=re.escape(f"where={where!r}")):
        treenn.freeze(net, where)
    with pytest.raises(TypeError, match=re.escape(f"where={where!r}")):
        nn.train_mode(net, where)


@pytest.mark.parametrize("pattern", ["nothing", "head.nope", "**.gamma", "backbone.layers.9"])
def test_explicit_selector_matching_nothing_names_it(pattern, net):
    message = re.escape(f"where={pattern!r} matches no")
    with pytest.raises(ValueError, match=message):
        treenn.freeze(net, pattern)
    with pytest.raises(ValueError, match=message):
        treenn.unfreeze(net, pattern)
    with pytest.raises(ValueError, match=message):
        nn.eval_mode(net, pattern)
    with pytest.raises(ValueError, match=message):
        nn.train_mode(net, pattern)
    with pytest.raises(ValueError, match=message):
        nn.unpin(net, pattern)


def test_selector_matching_nodes_of_the_wrong_kind_is_an_error(net):
    # Matches nodes, but none the helper acts on.
    with pytest.raises(ValueError, match=re.escape("where='head' matches no mode-bearing")):
        nn.eval_mode(net, "head")
    with pytest.raises(ValueError, match=re.escape("where='backbone.layers.3' matches no")):
        treenn.freeze(net, "backbone.layers.3")  # a Dropout: no arrays
    with pytest.raises(ValueError, match=r"where=<getter .*<lambda>> matches no"):
        treenn.freeze(net, lambda m: m.backbone.layers[2])  # a Lambda: no leaves


# -- paths ----------------------------------------------------------------------------


def test_paths_are_pytorch_style_dotted(containers):
    paths = list(treenn.statuses(containers))
    assert paths[:4] == ["blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"]
    assert {"heads.enc.weight", "heads.dec.bias", "extra.0", "extra.1"} <= set(paths)
    assert frozen_paths(treenn.freeze(containers, "blocks.1.weight")) == {"blocks.1.weight"}
    assert frozen_paths(treenn.freeze(containers, "heads.dec")) == {
        "heads.dec.weight",
        "heads.dec.bias",
    }
    assert frozen_paths(treenn.freeze(containers, "blocks.*.bias")) == {
        f"blocks.{i}.bias" for i in range(11)
    }
    assert nn.modes(containers) == {"drops.a.0": False, "drops.a.1": False}
    assert nn.modes(nn.eval_mode(containers, "drops.a.1")) == {
        "drops.a.0": False,
        "drops.a.1": True,
    }


def _keystrs(model):
    return [jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(model)[0]]


def _dotted_paths(model):
    return list(treenn.statuses(model))


def test_paths_identical_for_frozen_arrays(net, containers):
    for model, partial in ((net, "backbone.**"), (containers, "**.bias")):
        for frozen in (treenn.freeze(model), treenn.freeze(model, partial)):
            assert _dotted_paths(frozen) == _dotted_paths(model)
            assert _keystrs(frozen) == _keystrs(model)
            # Selectors keep working on the frozen model.
            assert covered(partial, frozen) == covered(partial, model)
            assert covered(lambda m: m, frozen) == covered(lambda m: m, model)
    assert _keystrs(net)[0] == ".backbone.layers[0].weight"
    frozen = treenn.freeze(net)
    assert frozen_paths(treenn.freeze(frozen, "backbone.layers.0.weight")) == NET_PARAMS
    assert trainable_paths(treenn.unfreeze(frozen, "backbone.layers.0.weight")) == {
        "backbone.layers.0.weight"
    }
