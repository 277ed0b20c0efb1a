"""treenn.nn: layers (channels-last, batched, PyTorch parameter names) and modes."""

from ._attention import Attention as Attention, MultiheadAttention as MultiheadAttention
from ._conv import Conv2d as Conv2d
from ._dropout import Dropout as Dropout, DropPath as DropPath
from ._embedding import Embedding as Embedding
from ._linear import MLP as MLP, Identity as Identity, Linear as Linear, gelu as gelu
from ._modes import (
    eval_mode as eval_mode,
    modes as modes,
    pinned as pinned,
    train_mode as train_mode,
    unpin as unpin,
)
from ._normalization import (
    BatchNorm as BatchNorm,
    GroupNorm as GroupNorm,
    LayerNorm as LayerNorm,
    RMSNorm as RMSNorm,
)
from ._sequential import Lambda as Lambda, Sequential as Sequential
