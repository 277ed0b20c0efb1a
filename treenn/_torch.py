"""Loading PyTorch and timm checkpoints into treenn models: `treenn.load_torch`."""

from __future__ import annotations

from typing import Any


def load_torch(model: Any, state_dict_or_path: Any, *, strict: bool = True) -> Any:
    raise NotImplementedError("treenn.load_torch is being written (issue 9)")
