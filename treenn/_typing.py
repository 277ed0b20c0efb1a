"""Runtime type checking of users' model definitions: shapes and dtypes included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import beartype
import jaxtyping

F = TypeVar("F", bound=Callable[..., Any])


def typechecked(fn: F) -> F:
    """Check a function's (or a module method's) annotations at every call, jaxtyping
    shapes included: jaxtyping's `jaxtyped` with beartype, the checker treenn's own test
    suite runs under.

    Dimension names are shared across the arguments and the return value of one call,
    so `x: Float[Array, "batch features"], y: Int[Array, " batch"]` catches a batch of
    labels that does not match the batch of inputs, with an error naming the argument,
    the expected shape and the sizes bound so far.

    **Arguments:**

    - `fn`: the function or method to check (apply it to `__call__` for a module).

    **Returns:** the checked function. For a whole package, jaxtyping's import hook
    (`jaxtyping.install_import_hook("mypackage", "beartype.beartype")`) does the same
    without decorators.

    !!! Example

        ```python
        class Classifier(treenn.Module):
            @treenn.typechecked
            def __call__(self, x: Float[Array, "batch 16"]) -> Float[Array, "batch 3"]:
                ...
        ```
    """
    checked: F = jaxtyping.jaxtyped(typechecker=beartype.beartype)(fn)
    return checked
