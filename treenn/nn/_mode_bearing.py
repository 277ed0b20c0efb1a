"""The base of treenn's mode-bearing layers: the `inference` field and its pin, once."""

from __future__ import annotations

from .._modes import mode_of
from .._module import Module
from .._status import Pinned


class ModeBearing(Module):
    """A layer whose behaviour depends on a mode: `inference=False` is training
    behaviour, `True` evaluation behaviour (`nn.Dropout`, `nn.DropPath`, `nn.BatchNorm`).

    The mode is an ordinary field, as in Equinox, so `eqx.tree_at`,
    `eqx.nn.inference_mode`, `nn.eval_mode` and `nn.train_mode` all set it. A pinned
    layer (`pinned=True` at construction, or `nn.eval_mode(..., pin=True)`) keeps its
    mode through later calls with `pin=False` and through the implicit switches of
    `treenn.train_step`/`eval_step`. The pin is stored in the model, around the
    `inference` bool (a `Pinned` mark that attribute access reads through), so it is
    saved, loaded and kept by `eqx.tree_at` with the mode.

    Subclasses take `inference: bool = False, pinned: bool = False` as keyword
    arguments and pass them to `_init_mode` in their `__init__`.
    """

    inference: bool

    def _init_mode(self, inference: bool, pinned: bool) -> None:
        """Set the initial mode, pinned or not (call from `__init__`)."""
        self.inference = Pinned(inference) if pinned else inference  # type: ignore[assignment]

    @property
    def pinned(self) -> bool:
        """Whether the layer is pinned (see `nn.eval_mode`); the pin is stored around
        `inference`, so it is saved, loaded and kept by `eqx.tree_at` with it."""
        return mode_of(self)[1]
