"""`treenn.shard`: placement by rules in the `where=` language, and its errors.

Here, on the one device this process has; the multi-device cases (data parallel, FSDP,
tensor parallel, checkpoints, against the single-device run) are in sharding_cases.py,
run below in a subprocess with 8 simulated CPU devices.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NET_BUFFERS, NET_PARAMS, Net, leaves_by_path, optax_promotion, statuses
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import treenn
import treenn.nn as nn

ROOT = Path(__file__).resolve().parents[1]
CASES = Path(__file__).with_name("sharding_cases.py")


def specs(tree: object) -> dict[str, object]:
    """Dotted path -> the PartitionSpec of every array (marks unwrapped)."""
    out = {}
    for path, value in leaves_by_path(tree):
        if isinstance(value, jax.Array):
            assert isinstance(value.sharding, NamedSharding), path
            out[path] = value.sharding.spec
    return out


@pytest.fixture
def mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


# -- placement ----------------------------------------------------------------------------


def test_no_rules_replicates_every_array_keeping_status_and_values(net, mesh):
    model = treenn.freeze(net, "backbone.layers.0")
    placed = treenn.shard(model, mesh)
    assert specs(placed) == {p: P() for p in NET_PARAMS | NET_BUFFERS}
    assert statuses(placed) == statuses(model)  # frozen arrays and buffers keep marks
    assert placed.backbone.layers[3].p == net.backbone.layers[3].p  # non-arrays kept
    pairs = leaves_by_path(model)
    assert [p for p, _ in leaves_by_path(placed)] == [p for p, _ in pairs]
    for (path, value), (_, expected) in zip(leaves_by_path(placed), pairs):
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), path)


def test_first_matching_rule_wins(net, mesh):
    rules = {
        "head.weight": P("model", "data"),
        "**.weight": P("data"),
        "**.running_*": P("model"),
        "**": P(),
    }
    got = specs(treenn.shard(net, mesh, rules))
    assert got["head.weight"] == P("model", "data")
    assert got["backbone.layers.0.weight"] == P("data")
    assert got["backbone.layers.1.weight"] == P("data")
    assert got["backbone.layers.1.running_mean"] == P("model")
    assert got["head.bias"] == got["backbone.layers.4.bias"] == P()


def test_rules_take_every_kind_of_selector(net, mesh):
    rules = {nn.BatchNorm: P("model"), (lambda m: m.head): P("data"), None: P()}
    got = specs(treenn.shard(net, mesh, rules))
    assert got["backbone.layers.1.running_var"] == got["backbone.layers.1.bias"] == P("model")
    assert got["head.weight"] == got["head.bias"] == P("data")
    assert got["backbone.layers.0.weight"] == P()


def test_one_spec_places_a_batch(mesh):
    x, y = treenn.shard((jnp.ones((4, 3)), jnp.arange(4)), mesh, P("data"))
    assert x.sharding == NamedSharding(mesh, P("data")) == y.sharding
    placed = treenn.shard({"image": np.ones((2, 3), np.float32)}, mesh, P(None, "model"))
    assert placed["image"].sharding.spec == P(None, "model")


def test_load_places_arrays_like_a_sharded_like(tmp_path, net, mesh):
    path = tmp_path / "net.safetensors"
    treenn.save(path, net)
    rules = {"**.weight": P("data"), "**": P("model")}
    loaded = treenn.load(path, treenn.shard(Net(key=jax.random.key(5)), mesh, rules))
    assert specs(loaded) == specs(treenn.shard(net, mesh, rules))
    np.testing.assert_array_equal(loaded.head.weight, net.head.weight)
    plain = treenn.load(path, Net(key=jax.random.key(5)))  # unsharded like: unchanged
    assert not isinstance(plain.head.weight.sharding, NamedSharding)


# -- errors --------------------------------------------------------------------------------


def test_rule_value_that_is_not_a_partition_spec(net, mesh):
    with pytest.raises(TypeError, match=r"rule 'head\.\*' maps to \('data',\) \(tuple\), not a"):
        treenn.shard(net, mesh, {"head.*": ("data",), "**": P()})


def test_unknown_mesh_axis_names_axis_rule_and_mesh_axes(net, mesh):
    with pytest.raises(
        ValueError, match=r"rule '\*\*' \(P\('batch',\)\) uses mesh axis 'batch'.*'data', 'model'"
    ):
        treenn.shard(net, mesh, {"**": P("batch")})


def test_bad_spec_entries(net, mesh):
    with pytest.raises(ValueError, match=r"uses mesh axis 'data' twice"):
        treenn.shard(net, mesh, {"**": P("data", "data")})
    with pytest.raises(ValueError, match=r"has entry 1; each entry must be None, a mesh axis"):
        treenn.shard(net, mesh, {"**": P(1)})


def test_spec_longer_than_the_rank_names_path_shape_and_rule(net, mesh):
    with pytest.raises(
        ValueError,
        match=r"'head\.bias' has shape \(3,\) \(rank 1\), but rule 'head\.\*' gives "
        r"P\(None, 'model'\) for 2 dimensions",
    ):
        treenn.shard(net, mesh, {"head.*": P(None, "model"), "**": P()})


def test_unmatched_arrays_are_named(net, mesh):
    with pytest.raises(
        ValueError, match=r"no rule matches 'backbone\.layers\.0\.weight'.*catch-all.*\"\*\*\": P"
    ) as err:
        treenn.shard(net, mesh, {"head.*": P()})
    assert "'head.weight'" not in str(err.value).split("; rules")[0]


def test_rule_that_matches_nothing_is_named(net, mesh):
    with pytest.raises(ValueError, match=r"rule 'blocks\.\*\.attn\.qkv\.weight' matches no array"):
        treenn.shard(net, mesh, {"blocks.*.attn.qkv.weight": P("model"), "**": P()})


def test_rule_shadowed_by_an_earlier_one_is_named(net, mesh):
    with pytest.raises(
        ValueError,
        match=r"rule '\*\*\.weight' is never used: .*'head\.weight'.* placed by an earlier "
        r"rule \('\*\*'\); put the more specific rule first",
    ):
        treenn.shard(net, mesh, {"**": P(), "**.weight": P("data")})


def test_bad_selector_in_a_rule(net, mesh):
    with pytest.raises(ValueError, match=r"unsupported character"):
        treenn.shard(net, mesh, {"head.[0]": P(), "**": P()})


def test_bad_rules_and_mesh_types(net, mesh):
    with pytest.raises(TypeError, match="rules"):
        treenn.shard(net, mesh, [("**", P())])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mesh"):
        treenn.shard(net, "mesh", None)  # type: ignore[arg-type]


# -- optimiser states take the model's rules ------------------------------------------------

# A rule for the frozen BatchNorm alone, one for the conv weights, a catch-all.
FROZEN_BN_RULES = {
    nn.BatchNorm: P(),
    "backbone.**.weight": P(None, None, None, "model"),
    "**": P(),
}


def _state(tx: optax.GradientTransformation, model: object) -> object:
    with optax_promotion():
        return tx.init(treenn.trainable(model))


@pytest.mark.parametrize(
    "tx",
    [
        optax.sgd(0.1),
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
    ],
    ids=["sgd", "chain", "inject_hyperparams"],
)
def test_a_state_without_per_parameter_arrays_takes_the_models_rules(net, mesh, tx):
    """Regression: SGD's state has no arrays for the rules to match, and `shard` raised
    "rule BatchNorm matches no array; arrays: " (an empty list)."""
    model = treenn.freeze(net, nn.BatchNorm)
    assert specs(treenn.shard(model, mesh, FROZEN_BN_RULES))  # the model's own check passes
    placed = treenn.shard(_state(tx, model), mesh, FROZEN_BN_RULES)
    assert set(specs(placed).values()) <= {P()}  # scalars (a learning rate), replicated


@pytest.mark.parametrize(
    "rules",
    [FROZEN_BN_RULES, {"backbone.layers.1.*": P(), "**": P()}, {"**.running_var": P(), "**": P()}],
    ids=["class", "path-to-frozen-arrays", "buffers"],
)
def test_adam_state_of_a_model_with_frozen_batchnorm_takes_the_models_rules(net, mesh, rules):
    """Regression: Adam keeps no moments for a frozen BatchNorm (nor for buffers), so a rule
    for it matched no array of the state. It matches their places (`None` where
    `treenn.trainable` leaves them), and the moments follow their parameters' rules."""
    model = treenn.freeze(net, nn.BatchNorm)
    placed_model = treenn.shard(model, mesh, rules)
    placed = treenn.shard(_state(optax.adam(1e-3), model), mesh, rules)
    got = specs(placed)
    assert not any("layers.1" in path for path in got)  # no moments for the frozen BN
    for path, spec in specs(placed_model).items():
        if "layers.1" not in path:
            assert got[f"0.mu.{path}"] == got[f"0.nu.{path}"] == spec, path
    assert got["0.count"] == P()


def test_getter_and_path_rules_apply_within_each_copy_of_the_model(net, mesh):
    """A state holds the model behind a prefix (`0.mu.`): the model's path and getter
    rules apply within each copy, as to the model."""
    model = treenn.freeze(net, "backbone.layers.1")
    rules = {
        lambda m: m.backbone.layers[1]: P(),  # frozen: a place in the state, no array
        lambda m: m.head.weight: P("model"),
        "backbone.layers.0.weight": P(None, None, None, "model"),
        "**": P(),
    }
    want = specs(treenn.shard(model, mesh, rules))
    got = specs(treenn.shard(_state(optax.adam(1e-3), model), mesh, rules))
    assert got["0.mu.head.weight"] == got["0.nu.head.weight"] == want["head.weight"] == P("model")
    layer = "backbone.layers.0.weight"
    assert got[f"0.mu.{layer}"] == want[layer] == P(None, None, None, "model")
    pair = specs(treenn.shard((model, _state(optax.adam(1e-3), model)), mesh, rules))
    assert pair["0.head.weight"] == pair["1.0.nu.head.weight"] == P("model")


def test_multi_transform_state_takes_the_models_rules(net, mesh):
    """The head trains with plain SGD (no state), the rest with Adam, whose state holds
    optax's MaskedNode for the head: a rule for the head matches those places."""
    labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "head" if path[0].name == "head" else "body", params
    )
    tx = optax.multi_transform({"head": optax.sgd(0.1), "body": optax.adam(1e-3)}, labels)
    rules = {"head.*": P(), "**": P()}
    placed = treenn.shard(_state(tx, net), mesh, rules)
    assert not any("head" in path for path in specs(placed))


def test_a_rule_that_matches_nothing_in_the_model_still_fails_for_its_state(net, mesh):
    """The unused-rule error stays: a typo matches neither an array nor the place of one."""
    model = treenn.freeze(net, nn.BatchNorm)
    rules = {"backbone.layers.1.wieght": P(), "**": P()}
    for tree in (model, _state(optax.adam(1e-3), model), treenn.trainable(model)):
        with pytest.raises(
            ValueError, match=r"shard: rule 'backbone\.layers\.1\.wieght' matches no array"
        ):
            treenn.shard(tree, mesh, rules)


def test_a_dict_of_models_keeps_full_paths(net, mesh):
    """Copy-relative matching is for optimiser states: in a dict of two models, a rule
    written for one model's paths without its key matches nothing."""
    with pytest.raises(ValueError, match=r"shard: rule 'head\.\*' matches no array"):
        treenn.shard({"a": net, "b": net}, mesh, {"head.*": P("model"), "**": P()})
    placed = treenn.shard({"a": net, "b": net}, mesh, {"a.head.*": P("model"), "**": P()})
    assert specs(placed)["a.head.weight"] == P("model") and specs(placed)["b.head.weight"] == P()


def test_a_batch_keeps_the_unused_rule_check(mesh):
    batch = {"image": jnp.ones((2, 3)), "label": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"shard: rule 'images' matches no array"):
        treenn.shard(batch, mesh, {"images": P("data"), "**": P()})


def test_module_arrays_over_explicit_axes_are_refused(net):
    explicit = jax.make_mesh((1,), ("data",))  # jax.make_mesh's default: Explicit axes
    with pytest.raises(
        ValueError, match=r"'backbone\.layers\.0\.weight' over mesh axis 'data', which is Explicit"
    ):
        treenn.shard(net, explicit, {"**.weight": P("data"), "**": P()})
    # Replicated models and batches are fine on Explicit axes (data parallelism).
    assert specs(treenn.shard(net, explicit)) == {p: P() for p in NET_PARAMS | NET_BUFFERS}
    assert treenn.shard(jnp.ones((2, 3)), explicit, P("data")).sharding.spec == P("data")


# -- 8 simulated devices, in subprocesses -----------------------------------------------

CASE_NAMES = re.findall(r"^def (test_\w+)", CASES.read_text(), re.M)


@pytest.fixture(scope="module")
def launched(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[subprocess.Popen[str], Path]]]:
    """Start sharding_cases.py (under pytest, same strict conftest) and the example side
    by side, each with 8 simulated CPU devices: compilation is mostly single-threaded."""
    folder = tmp_path_factory.mktemp("sharding")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    commands = {
        "cases": (
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                str(CASES),
                f"--junitxml={folder / 'cases.xml'}",
            ],
            {**env, "XLA_FLAGS": flags},
        ),
        # The example sets the device count itself (--devices, default 8).
        "example": ([sys.executable, "examples/sharded.py", "--quick", "--out", str(folder)], env),
    }
    started = {}
    for name, (command, environment) in commands.items():
        log = open(folder / f"{name}.log", "w")  # a file: a full pipe would block the run
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        log.close()
        started[name] = (process, folder)
    yield started
    for process, _ in started.values():  # one the selected tests did not wait for
        if process.poll() is None:
            process.kill()
        process.wait()


def finished(launched: dict[str, tuple[subprocess.Popen[str], Path]], name: str) -> tuple[int, str]:
    process, folder = launched[name]
    try:
        code = process.wait(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    return code, (folder / f"{name}.log").read_text()


@pytest.fixture(scope="module")
def eight_devices(launched) -> tuple[dict[str, str | None], str]:
    """`({case: None if passed else its failure}, output)` of sharding_cases.py."""
    _, output = finished(launched, "cases")
    report = launched["cases"][1] / "cases.xml"
    outcomes: dict[str, str | None] = {}
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            problem = next(
                (p for p in map(case.find, ("failure", "error", "skipped")) if p is not None), None
            )
            outcomes[case.get("name", "")] = (
                None if problem is None else (problem.text or problem.get("message", "failed"))
            )
    return outcomes, output[-8000:]


def test_the_cases_are_found():
    assert len(CASE_NAMES) >= 6, CASE_NAMES


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_NAMES)
def test_on_eight_simulated_devices(eight_devices, case):
    outcomes, output = eight_devices
    assert case in outcomes, f"{case} did not run; subprocess output:\n{output}"
    problem = outcomes[case]
    assert problem is None, f"{case} failed on 8 devices:\n{problem}"


@pytest.mark.slow
def test_example_fine_tunes_on_the_mesh_as_on_one_device(launched):
    code, out = finished(launched, "example")
    assert code == 0, out[-5000:]
    assert "mesh: 8 devices on 1 process(es)" in out
    total, held = map(int, re.search(r"arrays: (\d+) KiB in all, (\d+) KiB on each", out).groups())
    assert held < total / 4, out  # FSDP: a device holds a fraction of the model
    assert "Adam moment of layer2.0.conv1.weight: P('data',), like its parameter" in out
    assert "after training: layer4.1.conv2.weight still P('data',)" in out
    number = r"([0-9.]+(?:e[+-]\d+)?)"
    check = re.search(
        rf"loss {number} vs {number}; largest difference in gradients {number} \(largest "
        rf"gradient {number}\), in BatchNorm statistics {number}",
        out,
    )
    assert check, out
    loss_mesh, loss_one, grad_diff, grad_max, stats_diff = map(float, check.groups())
    assert abs(loss_mesh - loss_one) < 1e-5 and grad_diff < 1e-4 * grad_max and stats_diff < 1e-5
    losses = [float(x) for x in re.findall(r"^step +\d+  loss ([0-9.]+)", out, re.M)]
    assert len(losses) >= 2 and losses[-1] < losses[0], out
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert accuracy > 0.15, out  # ten classes; ten steps
    assert "saved and reloaded, values and placement identical: yes" in out
