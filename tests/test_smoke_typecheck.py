import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

import treenn.nn as nn


def test_runtime_typechecking_is_active(key):
    # An int array where the signature says Float: only the jaxtyping hook catches it.
    layer = nn.Linear(2, 3, key=key)
    with pytest.raises(TypeCheckError):
        layer(jnp.ones((4, 2), jnp.int32))
