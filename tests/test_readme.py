"""The README: its quick start runs as written and does what it says; its two commands
are the ones CI runs and the example that exists. (tests/test_docs.py runs every block.)"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import treenn
import treenn.nn as nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


@pytest.mark.slow
def test_quick_start_runs(tmp_path, monkeypatch):
    quick_start = next(b for b in python_blocks() if "class Net(treenn.Module)" in b)
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
    assert nn.modes(model)["backbone.layers.1"] is True  # pinned eval survived the steps
    assert (tmp_path / "model.safetensors").exists()
    assert treenn.statuses(namespace["model"])["backbone.layers.0.weight"] == "frozen"


def test_the_two_commands_are_ci_and_the_main_job():
    text = README.read_text()
    commands = re.search(r"## The two commands\n\n```bash\n(.*?)```", text, re.S)[1]
    lines = [line.split("#")[0].strip() for line in commands.splitlines()]
    assert lines == [
        'pip install -e ".[examples]" && python examples/finetune.py',
        'pip install -e ".[test,docs]" && pytest',
    ]
    assert (ROOT / "examples" / "finetune.py").exists()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    # CI runs exactly the README's test command.
    assert ci[-2:] == ['pip install -e ".[test,docs]"', "pytest"]


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text()):
        assert (ROOT / target).exists(), target
