"""treenn.nn: layers (channels-last, batched, PyTorch parameter names) and modes."""

from ._conv import Conv2d as Conv2d
from ._dropout import Dropout as Dropout
from ._linear import Linear as Linear
from ._modes import (
    eval_mode as eval_mode,
)
from ._modes import (
    modes as modes,
)
from ._modes import (
    pinned as pinned,
)
from ._modes import (
    train_mode as train_mode,
)
from ._modes import (
    unpin as unpin,
)
from ._normalization import BatchNorm as BatchNorm
from ._normalization import LayerNorm as LayerNorm
from ._sequential import Lambda as Lambda
from ._sequential import Sequential as Sequential
