"""treenn.nn: layers (channels-last, batched, PyTorch parameter names) and modes."""

from ._conv import Conv2d as Conv2d
from ._dropout import Dropout as Dropout
from ._linear import Linear as Linear
from ._modes import (
    eval_mode as eval_mode,
    modes as modes,
    pinned as pinned,
    train_mode as train_mode,
    unpin as unpin,
)
from ._normalization import BatchNorm as BatchNorm, LayerNorm as LayerNorm
from ._sequential import Lambda as Lambda, Sequential as Sequential
