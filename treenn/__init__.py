"""treenn: Equinox-style immutable pytree modules with tree-surgery mode switching."""

from . import nn as nn
from ._checkpoints import CheckpointError as CheckpointError
from ._checkpoints import load as load
from ._checkpoints import save as save
from ._freezing import freeze as freeze
from ._freezing import unfreeze as unfreeze
from ._jit import jit as jit
from ._module import Module as Module
from ._selectors import Where as Where
from ._state import apply as apply
from ._summary import summary as summary
from ._transforms import (
    apply_updates as apply_updates,
)
from ._transforms import (
    combine as combine,
)
from ._transforms import (
    grad as grad,
)
from ._transforms import (
    partition as partition,
)
from ._transforms import (
    trainable as trainable,
)
from ._transforms import (
    value_and_grad as value_and_grad,
)

__version__ = "0.1.0"
