"""Per-path optimiser groups: `treenn.labels` and `treenn.layer_decay`.

Rules are matched as `treenn.shard`'s are (first match wins, selectors resolved once
against the model), by the same `RuleSet` (`_rules.py`). The result is a callable, as optax's
`multi_transform` accepts: it labels whatever trainable tree of the model it is given,
so one optimiser keeps working across `unfreeze` + `migrate_opt_state`. (A labels *tree*
with the model's structure would not do: its root is the model, which is callable, and
optax would call it.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._rules import RuleSet
from ._selectors import few
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

    def __init__(self, rules: RuleSet, paths: dict[str, str], scales: Any = None):
        self._rules = rules
        self.paths = paths
        self.scales: dict[str, float] | None = scales

    def label(self, path: str) -> str:
        """The label of the array at `path` (first matching rule)."""
        found = self.paths.get(path)
        if found is None:
            rule = self._rules.peek(path)
            if rule is None:
                raise self._rules.unmatched(
                    "treenn.labels", "trainable array ", repr(path), _ADVICE
                )
            found = self.paths[path] = rule.value
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


_ADVICE = "End them with a catch-all such as '**': 'default'"


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
    return _label("treenn.labels", model, RuleSet(rules.items(), model))


def _label(fn: str, model: Any, resolved: RuleSet, scales: Any = None, head: Any = None) -> Labels:
    """Label the model's arrays by `resolved`; `head`, a rule exempt from the check
    that every rule labels something."""
    paths, leaves, _ = flatten(model)
    found: dict[str, str] = {}
    unmatched = []
    names = []
    for path, leaf in zip(paths, leaves):
        if not is_array_leaf(leaf):
            continue
        name = dotted(path)
        names.append(name)
        rule = resolved.first(name)
        if rule is not None:
            found[name] = rule.value
        elif status_of(leaf) is Status.TRAINABLE:
            unmatched.append(name)
    if unmatched:
        raise resolved.unmatched(fn, "trainable array(s) ", few(unmatched), _ADVICE)
    resolved.check_used(
        fn,
        names,
        names,
        nothing="no array of the model",
        verb="labelled",
        exempt=lambda rule: rule is head,
    )
    return Labels(resolved, found, scales)


def layer_decay(model: Any, decay: float) -> Labels:
    """Layer-wise learning-rate decay (BEiT/MAE fine-tuning), as timm computes it
    (`param_groups_layer_decay` over the model's `group_matcher`): the model names its
    layers, input to output, and each layer's learning rate is the base rate times
    `decay ** (n - i)` for the `i`-th of them (the first is 0), where `n` is their
    number; the arrays in none of them (the head) form layer `n`, at the base rate.

    The model names its layers with a `layer_groups()` method. The zoo's models have one,
    grouped as timm groups its own: a `treenn.models.VisionTransformer`'s are the
    embeddings (`patch_embed`, `cls_token`, `pos_embed`), then each block (`blocks.i`),
    the final `norm` with the last block, so the head alone is at the base rate; a
    `treenn.models.ResNet`'s are the stem (`conv1`, `bn1`), then each block (`layer1.0`,
    `layer1.1`, ...: timm's fine-grained groups), `fc` last. A model of your own
    provides it too:

    ```python
    class Net(treenn.Module):
        ...

        def layer_groups(self):
            # input to output; each a selector or a list of selectors; the rest (the
            # head) comes after them
            return [["embed", "pos"], *(f"blocks.{i}" for i in range(len(self.blocks)))]
    ```

    Each group is one selector (a path glob, a class, a getter) or a `list` of them;
    an array takes the first group that selects it, and a group that selects no array
    is an error naming it, as in `treenn.labels`.

    **Arguments:**

    - `model`: a model with a `layer_groups()` method (the zoo's ViT and ResNet, or
        yours), adapted by `treenn.lora` or not (paths are what count).
    - `decay`: the factor per layer, in `(0, 1]` (timm's `layer_decay`, e.g. 0.75).

    **Returns:** a `Labels` (labels `"layer_0"` ... `"layer_{n}"`) whose `scales` maps
    each label to its factor; `labels.transforms(make)` builds the dict for
    `optax.multi_transform`. Raises `TypeError` for a model without `layer_groups()`
    (add one, or write the rules for `treenn.labels` yourself), or when it does not
    return a list of groups.

    !!! Example

        ```python
        groups = treenn.layer_decay(model, 0.75)
        tx = optax.multi_transform(groups.transforms(lambda s: optax.adamw(1e-3 * s)), groups)
        opt_state = tx.init(treenn.trainable(model))
        ```
    """
    check_model(model, "treenn.layer_decay")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ValueError(f"treenn.layer_decay: decay={decay!r} must be in (0, 1]")
    groups = _layer_groups(model)
    rules: list[tuple[Any, str]] = [
        (where, f"layer_{i}")
        for i, group in enumerate(groups)
        for where in (group if isinstance(group, list) else [group])
    ]
    depth = len(groups)
    rules.append(("**", f"layer_{depth}"))  # the head: what no group selects
    scales = {f"layer_{i}": float(decay) ** (depth - i) for i in range(depth + 1)}
    resolved = RuleSet(rules, model)
    head = resolved.rules[-1]  # a model may have no array outside its groups
    return _label("treenn.layer_decay", model, resolved, scales, head)


def _layer_groups(model: Any) -> list[Any]:
    method = getattr(model, "layer_groups", None)
    name = type(model).__qualname__
    if not callable(method):
        raise TypeError(
            f"treenn.layer_decay: {name} has no layer_groups() method, which names the "
            "model's layers from input to output (the head, after them, is left out): add "
            "one, e.g. `def layer_groups(self): return [['embed', 'pos'], 'blocks.0', "
            "'blocks.1']` (each group a selector or a list of selectors), or label the "
            "groups with treenn.labels and scale each group's learning rate yourself"
        )
    groups = method()
    if not isinstance(groups, (list, tuple)) or not groups:
        raise TypeError(
            f"treenn.layer_decay: {name}.layer_groups() returned {groups!r}; it must return "
            "a non-empty list of groups, input to output, each a selector or a list of "
            "selectors"
        )
    return list(groups)
