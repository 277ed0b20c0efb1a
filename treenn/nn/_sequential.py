"""Containers: `Sequential` and `Lambda`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from .._module import Module


class Lambda(Module):
    """Wrap a parameter-free function (`jax.nn.relu`) as a layer; the function is static.

    **Arguments:**

    - `fn`: called as `fn(x)`.

    **Returns:** `layer(x)` returns `fn(x)`; `key` is ignored.

    !!! Example

        ```python
        act = nn.Lambda(jax.nn.relu)
        ```
    """

    fn: Callable[..., Any] = eqx.field(static=True)

    def __call__(self, x: Any, *, key: PRNGKeyArray | None = None) -> Any:
        return self.fn(x)


class Sequential(Module):
    """Call layers in order, splitting `key` among them.

    **Arguments:**

    - `*layers`: modules (called as `layer(x, key=k)`) or plain functions such as
        `jax.nn.relu` (wrapped in `nn.Lambda`).

    The layers live in the `layers` tuple, so paths read `layers.0.weight`.

    **Returns:** `model(x, key=None)` returns the last layer's output.

    !!! Example

        ```python
        model = nn.Sequential(nn.Linear(4, 8, key=k1), jax.nn.relu, nn.Linear(8, 2, key=k2))
        y = model(x)
        ```
    """

    layers: tuple[Any, ...]

    def __init__(self, *layers: Any):
        wrapped = []
        for i, layer in enumerate(layers):
            if isinstance(layer, eqx.Module):
                wrapped.append(layer)
            elif callable(layer):
                wrapped.append(Lambda(layer))
            else:
                raise TypeError(f"nn.Sequential: layer {i} is not callable: {layer!r}")
        self.layers = tuple(wrapped)

    def __call__(self, x: Any, *, key: PRNGKeyArray | None = None) -> Any:
        keys: list[Any] = (
            [None] * len(self.layers)
            if key is None
            else list(jax.random.split(key, len(self.layers)))
        )
        for layer, k in zip(self.layers, keys):
            x = layer(x, key=k)
        return x

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return Sequential(*self.layers[i])
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.layers)
