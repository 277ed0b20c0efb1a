"""The README's main job runs end to end (quick mode) and reports real measurements."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["linear probe", "BitFit", "gradual unfreezing", "full fine-tuning"]


@pytest.mark.slow
def test_finetune_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/finetune.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    rows = dict(re.findall(r"^\| ([a-zA-Z ()-]+?)\s+\|\s+([0-9.]+) \|", out, re.M))
    assert set(RECIPES) <= set(rows), out
    # Five classes: chance is 0.2; even a few steps of each recipe do better.
    assert all(float(rows[name]) > 0.3 for name in RECIPES), out
    assert "backbone bit-identical to the checkpoint's: yes" in out
    assert re.search(r"MC dropout .* entropy [0-9.]+ on \d+ correct", out), out
    assert (tmp_path / "pretrained.safetensors").exists()
    assert (tmp_path / "finetune.png").stat().st_size > 10_000


@pytest.mark.slow
def test_finetune_quick_from_pytorch_weights(tmp_path):
    # A PyTorch state dict (torch tensors under torchvision's names, in a .pt file) of a
    # pretrained small-stem ResNet-18 replaces the pretraining.
    import jax
    import torch
    from safetensors.numpy import load_file

    import treenn

    model = treenn.models.resnet18(
        1000, in_channels=3, width=8, small_input=True, key=jax.random.key(3)
    )
    # A state dict under the model's dotted paths: what a treenn checkpoint holds.
    treenn.save(tmp_path / "model.safetensors", model)
    state = {k: torch.tensor(v) for k, v in load_file(tmp_path / "model.safetensors").items()}
    state["bn1.num_batches_tracked"] = torch.tensor(7)  # PyTorch saves it; ignored
    torch.save(state, tmp_path / "resnet18.pt")
    result = subprocess.run(
        [sys.executable, "examples/finetune.py", "--quick", "--out", str(tmp_path)]
        + ["--weights", str(tmp_path / "resnet18.pt"), "--width", "8", "--in-channels", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    loaded = re.search(r"loaded (\d+) arrays from .*resnet18\.pt; new: (.*); not used: (.*)", out)
    assert loaded, out
    assert int(loaded[1]) == len(state) - 3  # all but the old head and the counter
    assert loaded[2] == "['fc.layers.1.weight', 'fc.layers.1.bias']"
    assert loaded[3] == "['fc.bias', 'fc.weight']"  # num_batches_tracked: ignored
    assert "pretrain" not in out.split("fine-tuning on digits 5-9")[0]
    rows = dict(re.findall(r"^\| ([a-zA-Z ()-]+?)\s+\|\s+([0-9.]+) \|", out, re.M))
    assert set(RECIPES) <= set(rows), out
    assert "backbone bit-identical to the checkpoint's: yes" in out
