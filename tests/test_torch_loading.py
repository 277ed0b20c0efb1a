"""`treenn.load_torch`: torchvision's ResNet-18/50 and timm's ViT (hand-written in
torch_reference.py, randomly initialised, BatchNorm statistics included) give the same
logits once loaded, and the same BatchNorm running statistics after a training step;
fused and split attention projections; Equinox layers; state dicts, .pt and .safetensors
files; strictness, reports, frozen status and buffers; every bad input's error."""

from __future__ import annotations

import copy
import functools
import inspect
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import torch_reference as ref
from conftest import (
    NET_BUFFERS,
    NET_PARAMS,
    Net,
    leaves_by_path,
    optax_promotion,
    paths_with,
    statuses,
)

import treenn
import treenn.nn as nn
from treenn import models

TOL = 1e-4


def close(got: Any, want: Any, tol: float = TOL) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)


def arrays(model: Any) -> dict[str, np.ndarray]:
    """Dotted path -> value of every array in a treenn model (marks unwrapped)."""
    status = treenn.statuses(model)
    return {p: np.asarray(x) for p, x in leaves_by_path(model) if p in status}


def nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def abstract(factory: Any, *args: Any, **kwargs: Any) -> Any:
    """A zoo model built by `jax.eval_shape`: shapes only, nothing initialised."""
    return jax.eval_shape(lambda k: factory(*args, key=k, **kwargs), jax.random.key(1))


@functools.cache
def resnets(name: str) -> tuple[torch.nn.Module, Any]:
    """A randomised torchvision-style ResNet and the treenn zoo model loaded from its
    state dict (shared: tests copy the torch model before training it). The same
    weights whatever ran before: torch's initialisation draws from its global generator."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = ref.randomise(getattr(ref, name)(10)).eval()
    model = treenn.load_torch(reference.state_dict(), abstract(getattr(models, name), 10))
    return reference, model


# Compiled once per model (far faster than op by op for a whole ResNet).
forward = treenn.jit(lambda model, x: model(x))
train_forward = treenn.jit(lambda model, x: treenn.apply(model, x))


# -- torchvision ResNets --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_resnet_logits_match_torchvision_in_eval_mode(name):
    reference, model = resnets(name)
    x = images(2, 32)
    with torch.no_grad():
        want = reference(x).numpy()
    close(forward(nn.eval_mode(model), nhwc(x)), want)
    # Everything was loaded, BatchNorm buffers as buffers: nothing of the model's own
    # initialisation is left.
    state = reference.state_dict()
    for path, value in arrays(model).items():
        np.testing.assert_array_equal(value, state[path].numpy(), err_msg=path)
    assert paths_with(model, "buffer") == {k for k in state if k.endswith(("_mean", "_var"))}


def bn_statistics(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in module.state_dict().items() if k.endswith(("_mean", "_var"))}


@pytest.mark.slow
def test_resnet50_batchnorm_statistics_match_after_a_training_forward():
    # A training step updates the running statistics in its forward pass (the gradient
    # never touches them); ResNet-18 below runs the whole step.
    reference, model = resnets("resnet50")
    reference = copy.deepcopy(reference).train()  # the shared one stays as it is
    x = images(4, 64, seed=1)
    with torch.no_grad():
        want = reference(x).numpy()
    logits, updated = train_forward(nn.train_mode(model), nhwc(x))
    close(logits, want)
    got = arrays(updated)
    stats = bn_statistics(reference)
    for path, value in stats.items():
        close(got[path], value)
    changed = [p for p in stats if not np.array_equal(got[p], arrays(model)[p])]
    assert len(changed) == len(stats)  # every statistic moved, and moved the same way


def one_sgd_step(reference: torch.nn.Module, model: Any, x: Any, y: Any) -> tuple[Any, ...]:
    """One SGD step with lr=1 (each update is a whole gradient, so a wrong gradient cannot
    hide under the tolerance) in torch and with `treenn.train_step`: the two losses, the
    arrays before, and the arrays after in treenn and in torch."""
    before = arrays(model)
    sgd = torch.optim.SGD(reference.parameters(), lr=1.0)
    loss = torch.nn.functional.cross_entropy(reference(x), y)
    loss.backward()
    sgd.step()
    tx = optax.sgd(1.0)
    xent = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    with optax_promotion():
        step = treenn.train_step(xent, tx)
        model, _, got_loss = step(model, tx.init(treenn.trainable(model)), nhwc(x), y.numpy())
    want = {k: v.numpy() for k, v in reference.state_dict().items()}
    return got_loss, loss.item(), before, arrays(model), want


def assert_same_step(
    before: dict[str, Any], got: dict[str, Any], want: dict[str, Any], stats: float, step: float
) -> None:
    """Running statistics within `stats`; every other array's update within `step` of
    its largest."""
    for path in got:
        if path.endswith(("running_mean", "running_var")):
            close(got[path], want[path], tol=stats)
            continue
        want_step = want[path] - before[path]
        scale = float(np.abs(want_step).max())
        assert scale > 0, path
        np.testing.assert_allclose(
            got[path] - before[path], want_step, rtol=0, atol=step * scale, err_msg=path
        )


def test_resnet18_one_sgd_step_matches_torch_statistics_and_weights():
    reference, model = resnets("resnet18")
    reference = copy.deepcopy(reference).train()
    x, y = images(4, 32, seed=2), torch.tensor([1, 2, 3, 4])
    got_loss, loss, before, got, want = one_sgd_step(reference, model, x, y)
    close(got_loss, loss)
    # Gradients through 18 layers, in float32, by other convolution algorithms: for
    # these weights (seed 0) they agree to 1.7e-4 of each array's largest update
    # (seeds 1-5: 1.2e-4 to 2.3e-4; some draws of BatchNorm over 4 images reach
    # 1e-2, which is why `resnets` fixes the seed); a layout error would be O(1).
    assert_same_step(before, got, want, stats=TOL, step=1e-3)


# -- timm ViTs ----------------------------------------------------------------------------

VIT = dict(img_size=16, patch_size=4, depth=2)


@pytest.mark.parametrize(
    "attention",
    [ref.Attention, ref.BeitAttention, ref.EvaAttention],
    ids=["fused-qkv", "beit-q_bias-v_bias", "eva-q_proj-k_proj-v_proj"],
)
def test_vit_logits_match_timm(attention):
    reference = ref.VisionTransformer(
        num_classes=5, embed_dim=48, num_heads=3, attn_layer=attention, **VIT
    )
    reference = ref.randomise(reference).eval()
    model = abstract(models.vit_tiny, 5, dim=48, num_heads=3, **VIT)
    model = treenn.load_torch(reference.state_dict(), model)
    x = images(2, 16)
    with torch.no_grad():
        want = reference(x).numpy()
    close(forward(nn.eval_mode(model), nhwc(x)), want)
    if attention is ref.BeitAttention:  # the unsaved key bias is zero in the merged bias
        bias = np.asarray(model.blocks[0].attn.qkv.bias)
        np.testing.assert_array_equal(bias[48:96], 0.0)
        np.testing.assert_array_equal(bias[:48], reference.blocks[0].attn.q_bias.detach())


# -- small models: PyTorch twins of conftest's Net -------------------------------------------


class TorchNet(torch.nn.Module):
    """conftest's Net in PyTorch (channels-first), same names."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1),
            torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.25),
            torch.nn.Conv2d(4, 4, 3, padding=1),
        )
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.backbone.layers(x).mean(dim=(2, 3)))


@functools.cache
def torch_net() -> TorchNet:
    return ref.randomise(TorchNet()).eval()


def net_state() -> dict[str, torch.Tensor]:
    return dict(torch_net().state_dict())


def test_state_dict_of_a_custom_module_loads_and_computes_the_same(net):
    state = net_state()
    assert "backbone.layers.1.num_batches_tracked" in state  # ignored: the model has none
    model = treenn.load_torch(state, net)
    x = images(2, 5)
    with torch.no_grad():
        want = torch_net()(x).numpy()
    close(nn.eval_mode(model)(nhwc(x)), want)


def test_loaded_arrays_do_not_share_memory_with_the_tensors(net):
    source = ref.randomise(TorchNet())
    model = treenn.load_torch(source.state_dict(), net)
    before = arrays(model)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # what an optimiser step on the torch model does
    for path, value in arrays(model).items():
        np.testing.assert_array_equal(value, before[path])


def test_frozen_arrays_and_buffers_keep_their_status(net):
    model = nn.eval_mode(treenn.freeze(net, "backbone.**"), "backbone.**", pin=True)
    loaded = treenn.load_torch(net_state(), model)
    assert statuses(loaded) == statuses(model)
    assert paths_with(loaded, "frozen") == NET_PARAMS - {"head.weight", "head.bias"}
    assert paths_with(loaded, "buffer") == NET_BUFFERS
    assert nn.modes(loaded) == nn.modes(model)
    for path, value in arrays(loaded).items():
        np.testing.assert_array_equal(value, net_state()[path].numpy(), err_msg=path)


def test_num_batches_tracked_loads_into_a_cumulative_batchnorm():
    torch_bn = torch.nn.BatchNorm2d(4, momentum=None)
    ref.randomise(torch_bn)
    bn = treenn.load_torch(torch_bn.state_dict(), nn.BatchNorm(4, momentum=None))
    assert int(bn.num_batches_tracked) == 7 and bn.num_batches_tracked.dtype == jnp.int32
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    torch_bn.train()
    with torch.no_grad():
        torch_bn(x)
    _, bn = treenn.apply(bn, nhwc(x))
    state = torch_bn.state_dict()
    close(bn.running_mean, state["running_mean"])
    close(bn.running_var, state["running_var"])
    assert int(bn.num_batches_tracked) == 8


# -- attention layouts ------------------------------------------------------------------------


@functools.cache
def torch_attention() -> torch.nn.MultiheadAttention:
    return ref.randomise(torch.nn.MultiheadAttention(8, 2, batch_first=True)).eval()


def test_torch_multihead_attention_loads_into_treenn_as_it_is(key):
    mha = treenn.load_torch(torch_attention().state_dict(), nn.MultiheadAttention(8, 2, key=key))
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, _ = torch_attention()(x, x, x, need_weights=False)
    close(nn.eval_mode(mha)(jnp.asarray(x.numpy())), want.numpy())


def test_fused_in_proj_splits_into_equinox_multihead_attention(key):
    mha = eqx.nn.MultiheadAttention(
        2,
        8,
        use_query_bias=True,
        use_key_bias=True,
        use_value_bias=True,
        use_output_bias=True,
        key=key,
    )
    mha = treenn.load_torch(torch_attention().state_dict(), mha)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, _ = torch_attention()(x[None], x[None], x[None], need_weights=False)
    xj = jnp.asarray(x.numpy())
    close(mha(xj, xj, xj), want[0].numpy())


def test_split_projections_need_all_their_parts(key):
    # A fused array cannot be assembled without its query part; strict says so.
    state = {k: v for k, v in torch_attention().state_dict().items()}
    w = state.pop("in_proj_weight")
    state["k_proj_weight"], state["v_proj_weight"] = w[8:16], w[16:]
    with pytest.raises(treenn.CheckpointError) as err:
        treenn.load_torch(state, nn.MultiheadAttention(8, 2, key=key))
    assert "missing from the state dict (1): 'in_proj_weight'" in str(err.value)
    assert "'k_proj_weight', 'v_proj_weight'" in str(err.value)
    # With the query part, the three merge.
    state["q_proj_weight"] = w[:8]
    mha = treenn.load_torch(state, nn.MultiheadAttention(8, 2, key=key))
    np.testing.assert_array_equal(mha.in_proj_weight, w.numpy())


def test_equinox_convolution_bias_is_reshaped(key):
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    ref.randomise(conv)
    layer = treenn.load_torch(conv.state_dict(), eqx.nn.Conv2d(3, 4, 3, padding=1, key=key))
    assert layer.bias.shape == (4, 1, 1)
    x = images(1, 5)
    with torch.no_grad():
        want = conv(x)[0].numpy()
    close(layer(jnp.asarray(x[0].numpy())), want)


# -- files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_files_round_trip(tmp_path, net, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.numpy.save_file({k: v.numpy() for k, v in net_state().items()}, str(path))
    else:
        torch.save(net_state(), path)
    for source in (path, str(path)):
        loaded = treenn.load_torch(source, net)
        for name, value in arrays(loaded).items():
            np.testing.assert_array_equal(value, net_state()[name].numpy(), err_msg=name)


def test_safetensors_needs_no_torch_but_pt_files_do(tmp_path, net, monkeypatch):
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pt"
    safetensors.numpy.save_file({k: v.numpy() for k, v in net_state().items()}, str(st))
    torch.save(net_state(), pt)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    loaded = treenn.load_torch(st, net)
    np.testing.assert_array_equal(loaded.head.weight, net_state()["head.weight"].numpy())
    with pytest.raises(ImportError, match=r"w\.pt.*needs torch.*treenn\[torch\]"):
        treenn.load_torch(pt, net)


def test_bfloat16_tensors_convert_bit_exactly(key):
    linear = torch.nn.Linear(4, 3).to(torch.bfloat16)
    ref.randomise(linear)
    model = treenn.load_torch(linear.state_dict(), nn.Linear(4, 3, dtype=jnp.bfloat16, key=key))
    bits = linear.weight.detach().view(torch.int16).numpy()
    np.testing.assert_array_equal(np.asarray(model.weight).view(np.int16), bits)
    # ...and are cast to a float32 model's dtype, as load_state_dict copies.
    model = treenn.load_torch(linear.state_dict(), nn.Linear(4, 3, key=key))
    assert model.weight.dtype == jnp.float32
    np.testing.assert_array_equal(model.weight, linear.weight.detach().float().numpy())


# -- strictness and reports -------------------------------------------------------------------


def test_strict_lists_every_missing_unexpected_and_misshaped_key(net):
    state = net_state()
    del state["backbone.layers.4.bias"]
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["backbone.layers.0.weight"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(treenn.CheckpointError) as err:
        treenn.load_torch(state, net)
    message = str(err.value)
    assert "missing from the state dict (2): 'backbone.layers.4.bias', 'head.bias'" in message
    assert "unexpected, not in the model (1): 'extra.weight'" in message
    assert (
        "mis-shaped (1): 'backbone.layers.0.weight': state dict float32[4, 3, 5, 5], "
        "model float32[4, 3, 3, 3]" in message
    )
    assert "strict=False" in message


def test_a_dtype_of_another_kind_is_misshaped(net):
    state = net_state()
    state["head.weight"] = torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(treenn.CheckpointError, match=r"'head.weight': state dict int64\[3, 4\]"):
        treenn.load_torch(state, net)


def test_non_strict_keeps_a_new_head_and_reports(key):
    new = Net(key=key, classes=5)
    model, report = treenn.load_torch(net_state(), new, strict=False, report=True)
    assert report.skipped == ["head.weight", "head.bias"]
    assert report.missing == [] and report.unexpected == []
    everything = paths_with(new, "trainable") | paths_with(new, "buffer")
    assert set(report.loaded) == everything - {"head.weight", "head.bias"}
    np.testing.assert_array_equal(model.head.weight, new.head.weight)
    np.testing.assert_array_equal(
        model.backbone.layers[0].weight, net_state()["backbone.layers.0.weight"].numpy()
    )
    # strict (the default) refuses the same.
    with pytest.raises(treenn.CheckpointError, match=r"mis-shaped \(2\)"):
        treenn.load_torch(net_state(), new)


def test_non_strict_reports_missing_and_unexpected(net):
    state = net_state()
    del state["head.bias"]
    state["old_head.weight"] = torch.zeros(1)
    model, report = treenn.load_torch(state, net, strict=False, report=True)
    assert report.missing == ["head.bias"] and report.unexpected == ["old_head.weight"]
    np.testing.assert_array_equal(model.head.bias, net.head.bias)


def test_an_abstract_model_must_be_filled_entirely():
    state = {k: v for k, v in net_state().items() if k != "head.bias"}
    model = jax.eval_shape(lambda k: Net(key=k), jax.random.key(0))
    with pytest.raises(treenn.CheckpointError, match=r"abstract .* does not fill 1 .*'head.bias'"):
        treenn.load_torch(state, model, strict=False)
    loaded = treenn.load_torch(net_state(), model)
    assert statuses(loaded) == statuses(Net(key=jax.random.key(0)))


def test_nothing_in_common_is_an_error_even_when_not_strict(net):
    with pytest.raises(treenn.CheckpointError, match="no array of the state dict fits"):
        treenn.load_torch({"other.weight": np.zeros(3, np.float32)}, net, strict=False)


def test_a_wrapper_prefix_gets_a_hint(net):
    state = {"module." + k: v for k, v in net_state().items()}
    with pytest.raises(treenn.CheckpointError, match=r"starts with 'module\.'"):
        treenn.load_torch(state, net)


# -- bad inputs ----------------------------------------------------------------------------------


def test_missing_file(tmp_path, net):
    with pytest.raises(FileNotFoundError, match=r"no file at .*nothing\.pt"):
        treenn.load_torch(tmp_path / "nothing.pt", net)


def test_unknown_extension(tmp_path, net):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"data")
    with pytest.raises(treenn.CheckpointError, match=r"extension '\.npz'.*\.pt.*\.safetensors"):
        treenn.load_torch(path, net)


def test_pt_file_without_a_dict(tmp_path, net):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(treenn.CheckpointError, match=r"list\.pt' holds a list, not a state dict"):
        treenn.load_torch(path, net)


def test_pt_file_with_a_whole_pickled_model(tmp_path, net):
    path = tmp_path / "model.pt"
    torch.save(TorchNet(), path)
    with pytest.raises(treenn.CheckpointError, match=r"weights_only=True\) failed"):
        treenn.load_torch(path, net)


def test_corrupt_safetensors_file(tmp_path, net):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x01")
    with pytest.raises(treenn.CheckpointError, match="truncated"):
        treenn.load_torch(path, net)


def test_training_checkpoint_gets_a_hint(net):
    checkpoint = {"epoch": 3, "state_dict": net_state()}
    with pytest.raises(
        treenn.CheckpointError, match=r"'epoch' \(int\).*pass its 'state_dict' entry"
    ):
        treenn.load_torch(checkpoint, net)


def test_neither_a_state_dict_nor_a_path(net):
    pairs = [("head.weight", np.zeros((3, 4), np.float32))]
    with pytest.raises(TypeError, match="expected a state dict .* got a list"):
        treenn.load_torch(pairs, net)


def test_old_argument_order_says_the_order_changed(tmp_path, net):
    """API.md §6: every loader takes the file first. `load_torch(model, path)` (the old
    order) must not be misread: a TypeError says the order changed, whether the file is
    a path or a state dict."""
    path = tmp_path / "net.safetensors"
    treenn.save(path, net)
    assert treenn.load_torch(path, net) is not None  # the new order loads
    for source in (path, str(path), net_state()):
        with pytest.raises(TypeError, match=r"takes the file first.*the order changed"):
            treenn.load_torch(net, source)
    # Without the tests' runtime checker too.
    with pytest.raises(TypeError, match=r"the order changed"):
        inspect.unwrap(treenn.load_torch)(net, str(path))


def test_numpy_and_jax_arrays_load_too(net):
    state = {k: v.numpy() for k, v in net_state().items()}
    state["head.weight"] = jnp.asarray(state["head.weight"])
    loaded = treenn.load_torch(state, net)
    for name, value in arrays(loaded).items():
        np.testing.assert_array_equal(value, np.asarray(state[name]))


# -- issue 15 ------------------------------------------------------------------------------------


def test_strict_rejects_a_weight_with_swapped_size_one_axes(key):
    """An (8, 1) weight (Linear(1, 8)) into a (1, 8) one (Linear(8, 1)): inputs and
    outputs swapped. PyTorch reports a size mismatch; so does load_torch."""
    state = torch.nn.Linear(1, 8).state_dict()
    with pytest.raises(
        treenn.CheckpointError,
        match=r"mis-shaped \(2\): 'weight': state dict float32\[8, 1\], model float32\[1, 8\]",
    ):
        treenn.load_torch(state, nn.Linear(8, 1, key=key))
    # The known layout difference across size-1 axes is still bridged.
    conv = torch.nn.Conv2d(3, 1, 1).state_dict()
    layer = treenn.load_torch(conv, eqx.nn.Conv2d(3, 1, 1, key=key))
    np.testing.assert_array_equal(np.asarray(layer.bias).reshape(1), conv["bias"].numpy())
    # ...but only for a bias of the output size.
    with pytest.raises(treenn.CheckpointError, match=r"'bias': state dict float32\[3\]"):
        treenn.load_torch({**conv, "bias": torch.zeros(3)}, eqx.nn.Conv2d(3, 1, 1, key=key))


def test_num_batches_tracked_of_a_batchnorm_the_model_lacks_is_unexpected(net):
    extra = {f"extra.{k}": v for k, v in torch.nn.BatchNorm2d(4).state_dict().items()}
    with pytest.raises(treenn.CheckpointError) as err:
        treenn.load_torch({**net_state(), **extra}, net)
    assert "unexpected, not in the model (5):" in str(err.value)
    assert "'extra.num_batches_tracked'" in str(err.value)
    # A lone counter (its statistics deleted) is unexpected too.
    lone = {**net_state(), "backbone.layers.7.num_batches_tracked": torch.tensor(3)}
    _, report = treenn.load_torch(lone, net, strict=False, report=True)
    assert report.unexpected == ["backbone.layers.7.num_batches_tracked"]


def test_resnet34_state_dict_into_resnet18_reports_its_batch_counters():
    reference = ref.randomise(ref.resnet34(10))
    model = resnets("resnet18")[1]
    _, report = treenn.load_torch(reference.state_dict(), model, strict=False, report=True)
    counters = [k for k in report.unexpected if k.endswith("num_batches_tracked")]
    assert len(counters) == 16  # 8 extra blocks, 2 BatchNorms each
    assert "layer1.2.bn1.num_batches_tracked" in counters


def test_attention_in_float64_keeps_float64_like_torch(key):
    """Torch's float64 attention agrees with a NumPy reference to ~1e-16; treenn's took
    its softmax in float32 (1e-7 off)."""
    torch_mha = ref.randomise(torch.nn.MultiheadAttention(8, 2, batch_first=True)).double().eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(4)) > 0.3
    mask.fill_diagonal_(False)  # True = masked in torch: every row keeps a key
    with torch.no_grad():
        want, want_weights = torch_mha(x, x, x, attn_mask=mask)
        want_plain, _ = torch_mha(x, x, x, need_weights=False)
    with jax.enable_x64(True):
        mha = nn.MultiheadAttention(8, 2, dtype=jnp.float64, key=key)
        mha = nn.eval_mode(treenn.load_torch(torch_mha.state_dict(), mha))
        xj = jnp.asarray(x.numpy())
        got = mha(xj)  # the path without weights
        got_masked, weights = mha(xj, attn_mask=jnp.asarray(mask.numpy()), need_weights=True)
        assert got.dtype == jnp.float64 and weights.dtype == jnp.float64
        close(got, want_plain.numpy(), tol=1e-12)
        close(got_masked, want.numpy(), tol=1e-12)
        close(weights, want_weights.numpy(), tol=1e-12)


@pytest.mark.slow
def test_resnet34_one_sgd_step_in_float64_matches_torch():
    """The README's claim as measured: in float32 only ResNet-18's step agrees to 1e-3
    of each update (a deeper net's ReLU input within rounding of zero may take the other
    sign in the other framework: ResNet-34 5e-3); in float64 the frameworks agree to
    rounding (1.7e-12 of an update measured)."""
    with torch.random.fork_rng():  # the same weights whatever ran before
        torch.manual_seed(0)
        reference = ref.randomise(ref.resnet34(10)).double().train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    with jax.enable_x64(True):
        model = abstract(models.resnet34, 10)
        model = jax.tree.map(
            lambda s: (
                jax.ShapeDtypeStruct(s.shape, jnp.float64)
                if jnp.issubdtype(s.dtype, jnp.floating)
                else s
            ),
            model,
        )
        model = treenn.load_torch(reference.state_dict(), model)
        got_loss, loss, before, got, want = one_sgd_step(reference, model, x, y)
        close(got_loss, loss, tol=1e-12)
        assert_same_step(before, got, want, stats=1e-12, step=1e-9)
