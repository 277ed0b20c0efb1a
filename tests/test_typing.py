"""Type-checked model definitions: `treenn.typechecked` and examples/typed_model.py."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jaxtyping import Array, Float, TypeCheckError

import treenn

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("typed_model", ROOT / "examples/typed_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_mismatched_batch_names_the_argument_and_the_axis():
    example = load_example()
    model, key = example.Classifier(key=jax.random.key(0)), jax.random.key(1)
    x, y = jnp.ones((8, 16)), jnp.zeros((8,), jnp.int32)
    with jax.numpy_dtype_promotion("standard"):  # optax, as users run it
        assert jnp.isfinite(example.loss_fn(model, x, y, key))
        with pytest.raises(TypeCheckError) as caught:
            example.loss_fn(model, x, jnp.zeros((5,), jnp.int32), key)
    message = str(caught.value)
    assert "parameter 'y'" in message
    assert "i32[5]" in message and "batch" in message
    assert "batch=8" in message  # the size the axis was bound to by `x`


def test_a_wrong_feature_size_is_caught_at_the_model_call():
    model = load_example().Classifier(key=jax.random.key(0))
    with pytest.raises(TypeCheckError, match="parameter 'x'"):
        model(jnp.ones((4, 15)))


def test_typechecked_checks_return_shapes():
    @treenn.typechecked
    def bad(x: Float[Array, "n"]) -> Float[Array, "n n"]:
        return x

    with pytest.raises(TypeCheckError, match="return"):
        bad(jnp.ones(3))


@pytest.mark.slow
def test_example_script_runs():
    result = subprocess.run(
        [sys.executable, "examples/typed_model.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "caught: Type-check error" in result.stdout
    assert "parameter 'y'" in result.stdout
