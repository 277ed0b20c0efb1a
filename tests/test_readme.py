"""The README's quick start runs as written and does what it says."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp

import treenn
import treenn.nn as nn

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    quick_start = next(b for b in blocks if "class Net(treenn.Module)" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    # Users run JAX's default ("standard") dtype promotion; optax needs it.
    with jax.numpy_dtype_promotion("standard"):
        exec(compile(quick_start, "README.md", "exec"), namespace)
        step, model, opt_state = namespace["step"], namespace["model"], namespace["opt_state"]
        x, y = jnp.ones((4, 8, 8, 1)), jnp.array([1, 2, 3, 4])
        head_before = model.head.weight
        conv_before = model.backbone.layers[0].weight
        model, opt_state, loss = step(model, opt_state, x, y, jax.random.key(1))
    assert jnp.isfinite(loss)
    assert not jnp.array_equal(model.head.weight, head_before)
    assert jnp.array_equal(model.backbone.layers[0].weight, conv_before)  # frozen
    assert nn.modes(model)["backbone.layers.1"] is True  # pinned eval survived train_mode-free step
    assert (tmp_path / "model.safetensors").exists()
    assert "frozen" in treenn.summary(model)


def test_fine_tuning_in_20_lines_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    snippet = next(b for b in blocks if "treenn.freeze_backbone" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):
        exec(compile(snippet.replace("range(100)", "range(3)"), "README.md", "exec"), namespace)
    report, model = namespace["report"], namespace["model"]
    assert len(report.loaded) > 0 and report.missing == []
    assert "accuracy" in capsys.readouterr().out
    trainable = treenn.trainable(model)
    assert trainable.layer4[0].conv1.weight is not None and trainable.layer1[0].conv1.weight is None
