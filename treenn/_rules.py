"""Rules: an ordered mapping from selectors to values, first match wins.

`treenn.shard` (selectors to `PartitionSpec`s) and `treenn.labels` / `treenn.layer_decay`
(selectors to optimiser-group labels) are both rule sets. Each rule's selector is
resolved once against the tree; a path takes the value of the first rule that covers
it; a rule that takes no path is an error (a typo, or a rule shadowed by an earlier one),
as is a path that no rule takes. What the values mean is the caller's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from ._selectors import Selection, describe, few, select


@runtime_checkable
class Copies(Protocol):
    """The copies of a model inside a tree that is not a model itself (the moments of an
    optimiser state): rules then apply within each copy as they do to the model.
    `_optimizers.ModelCopies` is one."""

    roots: dict[str, Any]

    def locate(self, path: str) -> tuple[str | None, str]: ...

    def holed(self, root: str) -> Any: ...


class Rule:
    """One `where -> value` rule, resolved against a tree. `used` lists the paths it
    took (it was the first rule to cover them).

    With `copies` (a tree holding copies of a model, such as an optimiser state), the
    rule also applies within each copy: a getter runs on each copy, and a glob or class
    selector matches a path relative to its copy as well as the full path.
    """

    __slots__ = ("where", "value", "selection", "per_copy", "copies", "used")

    def __init__(self, where: Any, value: Any, tree: Any, copies: Copies | None = None):
        self.where = where
        self.value = value
        self.used: list[str] = []
        self.copies = copies if copies is not None and copies.roots else None
        self.per_copy: dict[str, Selection | None] | None = None
        self.selection: Selection | None = None
        if self.copies is not None and _is_getter(where):
            # A getter navigates the model: run it on each copy (placeholders holed, so
            # that selecting one `None` does not select every `None`).
            self.per_copy = {r: select(where, self.copies.holed(r)) for r in self.copies.roots}
        else:
            self.selection = select(where, tree)

    def covers(self, path: str) -> bool:
        if self.copies is None:
            return self.selection is None or self.selection.covers(path)
        root, inner = self.copies.locate(path)
        if self.per_copy is not None:
            if root is None:
                return False
            selection = self.per_copy[root]
            return selection is None or selection.covers(inner)
        if self.selection is None:
            return True
        return self.selection.covers(path) or (root is not None and self.selection.covers(inner))

    @property
    def name(self) -> str:
        return rule_name(self.where)


class RuleSet:
    """Rules in order, resolved against `tree` (see `Rule`)."""

    def __init__(
        self, pairs: Iterable[tuple[Any, Any]], tree: Any, copies: Copies | None = None
    ) -> None:
        self.rules = [Rule(where, value, tree, copies) for where, value in pairs]

    def __iter__(self) -> Any:
        return iter(self.rules)

    def first(self, path: str) -> Rule | None:
        """The first rule covering `path`, which records it as used; `None` if none does."""
        for rule in self.rules:
            if rule.covers(path):
                rule.used.append(path)
                return rule
        return None

    def peek(self, path: str) -> Rule | None:
        """The first rule covering `path`, recording nothing."""
        return next((rule for rule in self.rules if rule.covers(path)), None)

    def names(self) -> str:
        return ", ".join(rule.name for rule in self.rules)

    def unmatched(self, fn: str, what: str, listing: str, advice: str) -> ValueError:
        """The error for paths no rule takes: `{fn}: no rule matches {what}{listing}`."""
        return ValueError(f"{fn}: no rule matches {what}{listing}; rules: {self.names()}. {advice}")

    def check_used(
        self,
        fn: str,
        names: list[str],
        candidates: list[str],
        *,
        nothing: str,
        verb: str,
        exempt: Callable[[Rule], bool] = lambda rule: False,
    ) -> None:
        """Raise for the first rule that took no path (unless `exempt`): it matches
        nothing among `candidates`, or everything it matches went to an earlier rule.
        `names` (the arrays) are listed in the first error; `nothing` says what the rule
        matches ("no array of the model"), `verb` what the earlier rule did ("placed")."""
        for rule in self.rules:
            if rule.used or exempt(rule):
                continue
            selected = [n for n in candidates if rule.covers(n)]
            if not selected:
                raise ValueError(f"{fn}: rule {rule.name} matches {nothing}; arrays: {few(names)}")
            earlier = [r.name for r in self.rules if set(r.used) & set(selected)]
            raise ValueError(
                f"{fn}: rule {rule.name} is never used: every array it matches "
                f"({few(selected, 4)}) is {verb} by an earlier rule ({', '.join(earlier)}); "
                "put the more specific rule first"
            )


def rule_name(where: Any) -> str:
    """How a rule is named in error messages."""
    return "(the whole tree)" if where is None else describe(where)


def _is_getter(where: Any) -> bool:
    return (
        callable(where)
        and not isinstance(where, (str, type, tuple))
        and not isinstance(where, Selection)
    )
