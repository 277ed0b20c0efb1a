"""treenn: Equinox-style immutable pytree modules with tree-surgery mode switching."""

from importlib import metadata as _metadata

from . import models as models, nn as nn
from ._caches import clear_caches as clear_caches
from ._checkpoints import (
    load as load,
    load_pretrained as load_pretrained,
    load_trainable as load_trainable,
    save as save,
)
from ._fill import LoadReport as LoadReport
from ._filter_spec import filter_spec as filter_spec
from ._freezing import (
    freeze as freeze,
    freeze_backbone as freeze_backbone,
    unfreeze as unfreeze,
)
from ._hf import (
    load_hf as load_hf,
    load_peft as load_peft,
    save_hf as save_hf,
    save_peft as save_peft,
)
from ._inspect import statuses as statuses
from ._jit import jit as jit
from ._labels import Labels as Labels, labels as labels, layer_decay as layer_decay
from ._lora import lora as lora, merge_lora as merge_lora
from ._module import Module as Module
from ._optimizers import migrate_opt_state as migrate_opt_state
from ._quantize import dequantize as dequantize, quantize as quantize
from ._remat import remat as remat
from ._safetensors import CheckpointError as CheckpointError
from ._selectors import Where as Where
from ._sharding import shard as shard
from ._state import apply as apply
from ._steps import eval_step as eval_step, train_step as train_step
from ._summary import summary as summary
from ._torch import load_torch as load_torch
from ._transforms import (
    apply_updates as apply_updates,
    combine as combine,
    grad as grad,
    partition as partition,
    trainable as trainable,
    value_and_grad as value_and_grad,
)
from ._typing import typechecked as typechecked

# The version lives in pyproject.toml only; installed metadata carries it here.
__version__ = _metadata.version("treenn")
