"""Per-path optimiser groups: `treenn.labels` and `treenn.layer_decay`.

Rules are matched as `treenn.shard`'s are (first match wins, selectors resolved once
against the model), by the same `_Rule` machinery. The result is a callable, as optax's
`multi_transform` accepts: it labels whatever trainable tree of the model it is given,
so one optimiser keeps working across `unfreeze` + `migrate_opt_state`. (A labels *tree*
with the model's structure would not do: its root is the model, which is callable, and
optax would call it.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from jax.sharding import PartitionSpec

from ._selectors import few
from ._sharding import _first_rule, _Rule, check_rules_used
from ._status import Status, is_array_leaf, status_of
from ._tree import check_model, dotted, flatten, unflatten


class Labels:
    """Optimiser-group labels of a model's arrays, by path: made by `treenn.labels`
    (or `treenn.layer_decay`), for `optax.multi_transform(transforms, labels)`.

    Calling it on `treenn.trainable(model)` (optax does) gives that tree with a label
    string at every array. It labels by path, so it serves the model after
    `treenn.unfreeze` too; an array no rule matches raises `ValueError` naming it.

    Attributes: `paths`, a dict from the dotted path of each array of the model (frozen
    ones included) to its label; `scales` (from `treenn.layer_decay`: label -> learning
    rate factor; `None` otherwise).

    **Arguments:** made by `treenn.labels(model, rules)` or `treenn.layer_decay(model,
    decay)`, not built directly. Called as `labels(params)`:

    - `params`: a tree of the model's arrays, usually `treenn.trainable(model)` (optax
        passes it).

    **Returns:** `params` with each array replaced by its label string (other leaves kept),
    the tree `optax.multi_transform` expects. `labels.label(path)` gives one path's label,
    `labels.transforms(make)` a `{label: make(scale)}` dict from `scales`.

    !!! Example

        ```python
        model = treenn.models.resnet18(10, key=jax.random.key(0))
        groups = treenn.labels(model, {"fc.**": "head", "**": "backbone"})
        groups.paths["fc.weight"]  # 'head'
        groups(treenn.trainable(model)).conv1.weight  # 'backbone'
        ```
    """

    def __init__(self, rules: list[_Rule], paths: dict[str, str], scales: Any = None):
        self._rules = rules
        self.paths = paths
        self.scales: dict[str, float] | None = scales

    def label(self, path: str) -> str:
        """The label of the array at `path` (first matching rule)."""
        found = self.paths.get(path)
        if found is None:
            rule = next((r for r in self._rules if r.covers(path)), None)
            if rule is None:
                raise ValueError(
                    f"treenn.labels: no rule matches trainable array {path!r}; rules: "
                    f"{', '.join(r.name for r in self._rules)}. End them with a catch-all "
                    "such as '**': 'default'"
                )
            found = self.paths[path] = _label_of(rule)
        return found

    def __call__(self, params: Any) -> Any:
        paths, leaves, treedef = flatten(params)
        out = [
            self.label(dotted(p)) if is_array_leaf(x) or _is_abstract(x) else x
            for p, x in zip(paths, leaves)
        ]
        return unflatten(treedef, out)

    def transforms(self, make: Callable[[float], Any]) -> dict[str, Any]:
        """`{label: make(scale)}` for `optax.multi_transform`, from `scales`
        (`treenn.layer_decay`): `labels.transforms(lambda s: optax.adamw(1e-3 * s))`."""
        if self.scales is None:
            raise ValueError(
                "Labels.transforms: these labels have no scales (they come from "
                "treenn.labels); build the transforms dict yourself"
            )
        return {label: make(scale) for label, scale in self.scales.items()}

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for label in self.paths.values():
            counts[label] = counts.get(label, 0) + 1
        shown = ", ".join(f"{k!r}: {v} arrays" for k, v in counts.items())
        return f"Labels({{{shown}}})"


class _LabelRule(_Rule):
    """A `treenn.shard` rule whose `spec` is a label string."""

    __slots__ = ()

    def __init__(self, where: Any, label: str, tree: Any):
        super().__init__(where, PartitionSpec(), tree)
        self.spec = label  # type: ignore[assignment]


def _label_of(rule: _Rule) -> str:
    return cast(str, rule.spec)


def _is_abstract(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def labels(model: Any, rules: Mapping[Any, str]) -> Labels:
    """Label a model's trainable arrays by path, for per-group optimisers (PyTorch's
    parameter groups): `optax.multi_transform(transforms, treenn.labels(model, rules))`
    over `treenn.trainable(model)`.

    **Arguments:**

    - `model`: a treenn or Equinox model.
    - `rules`: a mapping from selectors (`"head.**"`, `"**.lora_*"`, a class, a getter)
        to label strings; each array takes the label of the *first* rule that selects it,
        as in `treenn.shard` (end with `"**": "default"` to label the rest).

    **Returns:** a `Labels`: a callable that optax calls on the trainable tree, giving
    each trainable array its label; `labels.paths` shows them. Because it labels by
    path, it keeps labelling after `treenn.unfreeze` (pass the same optimiser to
    `treenn.migrate_opt_state`). Raises `ValueError` naming the array when a trainable
    array matches no rule, and naming the rule when a rule matches no array of the model
    (a rule that matches only frozen arrays counts as used: gradual unfreezing starts
    that way); `TypeError` when a label is not a string.

    !!! Example

        ```python
        groups = treenn.labels(model, {"head.**": "head", "**": "backbone"})
        tx = optax.multi_transform(
            {"head": optax.adam(1e-3), "backbone": optax.adam(1e-5)}, groups
        )
        opt_state = tx.init(treenn.trainable(model))
        ```
    """
    check_model(model, "treenn.labels")
    if not isinstance(rules, Mapping) or not rules:
        raise TypeError(
            "treenn.labels: rules must be a non-empty mapping from selectors to label "
            f"strings, e.g. {{'head.**': 'head', '**': 'backbone'}}; got {rules!r}"
        )
    for where, label in rules.items():
        if not isinstance(label, str):
            raise TypeError(
                f"treenn.labels: rule {where!r} maps to {label!r} "
                f"({type(label).__name__}); labels are strings, the keys of the "
                "transforms given to optax.multi_transform"
            )
    resolved: list[_Rule] = [_LabelRule(w, label, model) for w, label in rules.items()]
    return _label(model, resolved)


def _label(model: Any, resolved: list[_Rule], scales: Any = None) -> Labels:
    paths, leaves, _ = flatten(model)
    found: dict[str, str] = {}
    unmatched = []
    names = []
    for path, leaf in zip(paths, leaves):
        if not is_array_leaf(leaf):
            continue
        name = dotted(path)
        names.append(name)
        rule = _first_rule(resolved, name)
        if rule is not None:
            found[name] = _label_of(rule)
        elif status_of(leaf) is Status.TRAINABLE:
            unmatched.append(name)
    if unmatched:
        raise ValueError(
            f"treenn.labels: no rule matches trainable array(s) {few(unmatched)}; rules: "
            f"{', '.join(r.name for r in resolved)}. End them with a catch-all such as "
            "'**': 'default'"
        )
    unused = [rule for rule in resolved if not rule.used]
    check_rules_used(
        "treenn.labels",
        resolved,
        unused,
        names,
        names,
        nothing="no array of the model",
        verb="labelled",
    )
    return Labels(resolved, found, scales)


def layer_decay(model: Any, decay: float) -> Labels:
    """Layer-wise learning-rate decay for the zoo's ViT and ResNet, as timm computes it
    (`param_groups_layer_decay`, BEiT/MAE fine-tuning): layer 0 is the stem, each block
    is one layer (`blocks.i` of a ViT; `layer1.0`, `layer1.1`, ... of a ResNet: timm's
    fine-grained groups), and the head (with the final norm) is the last; a block's
    learning rate is the base rate times `decay ** (depth - block)` (block 0 being the
    first), the head's the base rate and the stem's `decay ** (depth + 1)` of it, where
    `depth` is the number of blocks.

    **Arguments:**

    - `model`: a `treenn.models.VisionTransformer` or `treenn.models.ResNet`, adapted by
        `treenn.lora` or not (paths are what count).
    - `decay`: the factor per layer, in `(0, 1]` (timm's `layer_decay`, e.g. 0.75).

    **Returns:** a `Labels` (labels `"layer_0"` ... `"layer_{depth + 1}"`) whose
    `scales` maps each label to its factor; `labels.transforms(make)` builds the dict for
    `optax.multi_transform`. Raises `TypeError` for another model (write the rules for
    `treenn.labels` yourself).

    !!! Example

        ```python
        groups = treenn.layer_decay(model, 0.75)
        tx = optax.multi_transform(groups.transforms(lambda s: optax.adamw(1e-3 * s)), groups)
        opt_state = tx.init(treenn.trainable(model))
        ```
    """
    from .models import ResNet, VisionTransformer

    check_model(model, "treenn.layer_decay")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ValueError(f"treenn.layer_decay: decay={decay!r} must be in (0, 1]")
    if isinstance(model, VisionTransformer):
        stem = ["patch_embed", "cls_token", "pos_embed"]
        blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    elif isinstance(model, ResNet):
        stem = ["conv1", "bn1"]
        blocks = [
            f"{stage}.{i}"
            for stage in ("layer1", "layer2", "layer3", "layer4")
            for i in range(len(getattr(model, stage)))
        ]
    else:
        raise TypeError(
            f"treenn.layer_decay: knows treenn.models.VisionTransformer and ResNet, got "
            f"{type(model).__qualname__}; give your blocks their labels with treenn.labels "
            "and scale each group's learning rate yourself"
        )
    depth = len(blocks)
    rules: dict[Any, str] = {where: "layer_0" for where in stem}
    rules.update({where: f"layer_{i + 1}" for i, where in enumerate(blocks)})
    rules["**"] = f"layer_{depth + 1}"
    scales = {f"layer_{i}": float(decay) ** (depth + 1 - i) for i in range(depth + 2)}
    resolved: list[_Rule] = [_LabelRule(w, label, model) for w, label in rules.items()]
    return _label(model, resolved, scales)
