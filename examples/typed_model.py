"""A type-checked model definition: shapes in the signatures, checked at every call.

    python examples/typed_model.py

Builds a small classifier whose `__call__` and loss are decorated with
`treenn.typechecked`, runs it on good inputs, then shows the error a mismatched batch
gets: it names the argument, the expected shape and the sizes bound so far.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

import treenn
import treenn.nn as nn

FEATURES, CLASSES = 16, 3


class Classifier(treenn.Module):
    """Linear - LayerNorm - ReLU - Dropout - Linear."""

    body: nn.Sequential
    head: nn.Linear

    def __init__(self, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.body = nn.Sequential(
            nn.Linear(FEATURES, 32, key=k1), nn.LayerNorm(32), jax.nn.relu, nn.Dropout(0.1)
        )
        self.head = nn.Linear(32, CLASSES, key=k2)

    @treenn.typechecked
    def __call__(
        self, x: Float[Array, "batch 16"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "batch 3"]:
        return self.head(self.body(x, key=key))


@treenn.typechecked
def loss_fn(
    model: Classifier,
    x: Float[Array, "batch 16"],
    y: Int[Array, " batch"],
    key: PRNGKeyArray,
) -> Scalar:
    logits = model(x, key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def main() -> None:
    key = jax.random.key(0)
    model = Classifier(key=key)
    x = jnp.ones((8, FEATURES))
    y = jnp.zeros((8,), jnp.int32)
    print("loss on a good batch:", float(loss_fn(model, x, y, key)))
    try:
        loss_fn(model, x, jnp.zeros((5,), jnp.int32), key)  # 5 labels for 8 inputs
    except TypeError as err:  # jaxtyping's TypeCheckError is a TypeError
        print("caught:", str(err).splitlines()[0])
        print("\n".join("   " + line for line in str(err).splitlines()[1:8]))


if __name__ == "__main__":
    main()
