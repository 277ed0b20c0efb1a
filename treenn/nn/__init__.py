"""treenn.nn: layers (channels-last, batched, PyTorch parameter names) and modes."""

from .._modes import (
    eval_mode as eval_mode,
    modes as modes,
    pinned as pinned,
    train_mode as train_mode,
    unpin as unpin,
)
from ._attention import Attention as Attention, MultiheadAttention as MultiheadAttention
from ._conv import (
    Conv1d as Conv1d,
    Conv2d as Conv2d,
    Conv3d as Conv3d,
    ConvTranspose1d as ConvTranspose1d,
    ConvTranspose2d as ConvTranspose2d,
    ConvTranspose3d as ConvTranspose3d,
)
from ._dropout import Dropout as Dropout, DropPath as DropPath
from ._embedding import Embedding as Embedding
from ._linear import MLP as MLP, Identity as Identity, Linear as Linear, gelu as gelu
from ._normalization import (
    BatchNorm as BatchNorm,
    GroupNorm as GroupNorm,
    LayerNorm as LayerNorm,
    RMSNorm as RMSNorm,
)
from ._pooling import (
    AdaptiveAvgPool1d as AdaptiveAvgPool1d,
    AdaptiveAvgPool2d as AdaptiveAvgPool2d,
    AdaptiveAvgPool3d as AdaptiveAvgPool3d,
    AvgPool1d as AvgPool1d,
    AvgPool2d as AvgPool2d,
    AvgPool3d as AvgPool3d,
    GlobalAvgPool as GlobalAvgPool,
    MaxPool1d as MaxPool1d,
    MaxPool2d as MaxPool2d,
    MaxPool3d as MaxPool3d,
)
from ._sequential import Lambda as Lambda, Sequential as Sequential
