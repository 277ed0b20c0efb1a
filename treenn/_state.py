"""State: `treenn.apply`, which returns the model with updated buffers.

Layers with state (BatchNorm's running statistics) compute their new values while they
run and *record* them into the context that the enclosing `treenn.apply` call owns;
`apply` then writes them into the model it returns. Nothing is threaded through
`__call__`, and since recording is a Python side effect at trace time it works the same
eagerly and under `jit`, `grad` (with `has_aux`), `vmap` of the whole call, and so on.

An `apply` nested in another (or in `treenn.train_step`) at the same trace level records
into the outermost one too, so the statistics reach the model the outermost call returns.

A side effect cannot leave a JAX transform (`lax.scan`, `vmap`, `checkpoint`...): an
`apply` called inside one that was opened inside another `apply` (or a `train_step`
loss) is *detached*. It writes its statistics into the model it returns, which is the
only way out of the transform, and reports what it updated to the enclosing call. That
call then needs the model the transform returned: a `train_step` loss returns it (aux),
and `through` (the hook for transforms inside a model, such as rematerialisation) hands
it back itself. The updated buffers of that model are then *claimed* as records of the
enclosing call's modules. A report nobody claims is an error naming the module's path.

A recording that could not reach the returned model is an error, never a silent loss:
no enclosing `apply`, a training-mode layer called directly inside a transform, or a
detached `apply` whose returned model was dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import equinox as eqx
import jax
import jax.extend.core as jex

from ._status import MARK_TYPES, Buffer, marked_like, unmarked
from ._tree import check_model, dotted, flatten, leaves, replace_fields, state_of, unflatten

T = TypeVar("T")

_TRANSFORMS = "a JAX transform (lax.scan, vmap, checkpoint, cond...)"
_RETURN_FROM_LOSS = (
    "return that model from the loss: `return loss, model` (or `loss, (model, metrics)`) "
    "with `treenn.train_step(..., has_aux=True)`; train_step takes its statistics"
)


def _trace_state() -> Any:
    return jex.get_opaque_trace_state(convention="nnx")


class _Records:
    """The updates of one outermost `apply` and of the same-level ones nested in it."""

    def __init__(self) -> None:
        # key -> (module, {field: new value}); the module is kept so that the id cannot
        # be reused while the call runs.
        self.updates: dict[int, tuple[Any, dict[str, Any]]] = {}
        self.names: dict[int, str] = {}  # key -> the module as errors name it
        # id(module a nested apply returned) -> (that module, key of its original)
        self.aliases: dict[int, tuple[Any, int]] = {}
        # A clock orders records and deliveries: `stamps[key]` is the time of the key's
        # last record, `delivered[key]` the time its values were last written into a
        # model a nested apply returned (a user holds them there).
        self.clock = 0
        self.stamps: dict[int, int] = {}
        self.delivered: dict[int, int] = {}

    def tick(self) -> int:
        self.clock += 1
        return self.clock


class _Report(NamedTuple):
    """A module whose statistics a detached `apply` wrote into the model it returned."""

    path: str  # in the model given to that apply
    what: str
    root: Any  # that model's tree structure, to tell whether `path` is comparable


class _Context:
    """One `treenn.apply` (or `train_step` loss, or `through`) call.

    `kind` says where a transform opened inside it sits, for the advice of errors:
    `"model"` (inside a model's `__call__`) or `"loss"` (inside a `train_step` loss).
    """

    def __init__(self, outer: _Context | None, kind: str) -> None:
        self.trace = _trace_state()
        self.kind = kind
        self.nested = outer is not None and outer.trace == self.trace
        # The enclosing call at another trace level, to report to (None: not detached).
        self.detached_from = outer if outer is not None and not self.nested else None
        self.records: _Records = outer.records if outer is not None and self.nested else _Records()
        self.start = self.records.clock
        self.reports: list[_Report] = []

    def key(self, module: Any) -> int:
        """The key of `module`'s records: its own id, or its original's when it is a
        module a nested `apply` returned (a second nested call updates the first's)."""
        alias = self.records.aliases.get(id(module))
        if alias is not None and alias[0] is module:
            return alias[1]
        return id(module)

    def entry(self, module: Any) -> tuple[int, dict[str, Any]] | None:
        key = self.key(module)
        entry = self.records.updates.get(key)
        if entry is None or (key == id(module) and entry[0] is not module):
            return None
        return key, entry[1]

    def put(self, key: int, module: Any, what: str, values: dict[str, Any]) -> None:
        entry = self.records.updates.setdefault(key, (module, {}))
        entry[1].update({k: jax.lax.stop_gradient(v) for k, v in values.items()})
        self.records.names.setdefault(key, what)
        self.records.stamps[key] = self.records.tick()

    def undelivered(self, key: int) -> bool:
        """Recorded during this call and not written into any model since."""
        stamp = self.records.stamps.get(key, -1)
        return stamp > self.start and self.records.delivered.get(key, -1) < stamp


_local = threading.local()


def _stack() -> list[_Context]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current_value(module: Any, name: str, default: Any) -> Any:
    """The value `name` has so far in this `apply` call: a module called twice (weight
    sharing) updates from its first call's result, as in PyTorch."""
    stack = _stack()
    if stack:
        entry = stack[-1].entry(module)
        if entry is not None and name in entry[1]:
            return entry[1][name]
    return default


def record(module: Any, what: str, **values: Any) -> None:
    """Record new values for `module`'s state fields, to be written by `treenn.apply`.

    `what` names the module in errors (e.g. `"nn.BatchNorm(16)"`).
    """
    stack = _stack()
    if not stack:
        raise RuntimeError(_outside_apply(what))
    context = stack[-1]
    if _trace_state() != context.trace:
        raise RuntimeError(_in_transform(what, context.kind))
    context.put(context.key(module), module, what, values)


def _outside_apply(what: str) -> str:
    return (
        f"{what} ran in training mode outside `treenn.apply`, so its updated running "
        "statistics would be lost. Call the model as `out, model = treenn.apply(model, "
        "x, key=key)`, or switch the layer to evaluation mode with `nn.eval_mode`."
    )


def _in_transform(what: str, kind: str) -> str:
    if kind == "loss":
        return (
            f"{what} ran in training mode inside {_TRANSFORMS} opened in the "
            "`treenn.train_step` loss; its running statistics cannot leave that "
            "transform as a side effect and would be lost. Call the model through "
            "`treenn.apply` inside the transform, return the model it gives back out of "
            f"the transform, and {_RETURN_FROM_LOSS}. Or switch the layer to evaluation "
            "mode with `nn.eval_mode(model, where, pin=True)`."
        )
    return (
        f"{what} ran in training mode inside {_TRANSFORMS} opened inside the model's "
        "`__call__`; its running statistics cannot leave that transform as a side "
        "effect and would be lost. Keep the layer outside the transform, or switch it "
        "to evaluation mode with `nn.eval_mode` (`pin=True` under `treenn.train_step`). "
        "A transform around the whole model works: call `treenn.apply` inside it and "
        "use the model it returns (in a `treenn.train_step` loss, "
        f"{_RETURN_FROM_LOSS})."
    )


def apply(model: T, *args: Any, **kwargs: Any) -> tuple[Any, T]:
    """Call `model(*args, **kwargs)` and return `(output, model)` with updated state.

    **Arguments:**

    - `model`: the model to call (a treenn or Equinox module, or any callable pytree).
    - `*args`, `**kwargs`: passed to the model, e.g. the input and `key=`.

    **Returns:** `(output, new_model)`: `new_model` is `model` with the state that the
    call updated (BatchNorm running statistics in training mode); everything else is
    shared with `model`. Called inside another `apply` (or a loss of
    `treenn.train_step`), the updates also reach the model the outermost call returns.
    Called inside a JAX transform within a `train_step` loss (`lax.scan` over
    micro-batches, an `eqx.filter_vmap` ensemble, `eqx.filter_checkpoint`), the updates
    leave the transform in `new_model`: return it from the loss (`has_aux=True`).

    !!! Example

        ```python
        def loss_fn(model, x, y, key):
            logits, model = treenn.apply(model, x, key=key)
            return cross_entropy(logits, y), model

        (loss, model), grads = treenn.value_and_grad(loss_fn, has_aux=True)(model, x, y, key)
        ```
    """
    check_model(model, "treenn.apply")
    if not callable(model):
        raise TypeError(
            f"treenn.apply: the model ({type(model).__name__}) is not callable; pass the "
            "model first, then its inputs: `treenn.apply(model, x, key=key)`"
        )
    return run(lambda m: m(*args, **kwargs), model)


def run(
    fn: Callable[[T], Any],
    model: T,
    *,
    kind: str = "model",
    returns: Callable[[Any], Any] | None = None,
) -> tuple[Any, T]:
    """`fn(model)` with state collection: `(output, model with updated state)`.

    `treenn.apply` is `run(lambda m: m(x), model)`; `treenn.train_step` runs a whole
    loss function this way (`kind="loss"`), so that a loss calling `model(x)` directly
    updates state. `returns(output)` gives what may hold the model `fn` returned (the
    loss's aux): where a detached `apply` inside `fn` updated statistics, they are
    taken from it.
    """
    out, new, _ = _run(fn, model, kind, returns)
    return out, new


def through(module: Any, call: Callable[[Any], tuple[Any, Any]]) -> Any:
    """`call(module)[0]`, where `call` runs `module` through `apply` inside a JAX
    transform and returns `(out, updated module)` out of it (rematerialisation:
    `eqx.filter_checkpoint(apply)(module, x)`). The updated module's statistics are
    recorded into the enclosing `apply`, as if `module` had run here directly.

    For treenn's own wrappers inside a model's `__call__`; the module `call` receives
    holds the statistics recorded so far in this call (a block run twice continues
    from its first run).
    """
    (out, _), _, _ = _run(
        lambda m: call(_current(m)), module, "model", lambda out: out[1], adopted=True
    )
    return out


def _run(
    fn: Callable[[T], Any],
    model: T,
    kind: str,
    returns: Callable[[Any], Any] | None,
    adopted: bool = False,
) -> tuple[Any, T, _Context]:
    stack = _stack()
    context = _Context(stack[-1] if stack else None, kind)
    stack.append(context)
    try:
        out = fn(model)
    finally:
        stack.pop()
    if context.reports:
        back = _returned_model(returns(out) if returns is not None else None, model)
        _claim(context, model, back)
    if adopted:
        # The caller drops the model that would be returned here: the records stay in
        # the enclosing apply's, which writes them (and checks that none is lost).
        if not context.nested and context.records.updates:
            key = next(iter(context.records.updates))
            what = context.records.names.get(key, "a layer")
            if context.detached_from is None:
                raise RuntimeError(_outside_apply(what))
            raise RuntimeError(_in_transform(what, context.detached_from.kind))
        return out, model, context
    if not context.records.updates:
        return out, model, context
    return out, _write(model, context), context


def _current(module: Any) -> Any:
    """`module` with the statistics recorded so far in the current call."""
    context = _stack()[-1]
    if not context.records.updates:
        return module
    return _written(module, context, alias=False)[0]


def _written(model: Any, context: _Context, alias: bool = True) -> tuple[Any, dict[int, str]]:
    """`model` with the recorded updates of its modules, and the keys written (with the
    dotted path of their module). In a nested call, `alias` registers each updated
    module, so that a second nested apply on it updates its original's records."""
    found: dict[int, int] = {}  # id(module in model) -> key of its records

    def recorded(x: Any) -> bool:
        entry = context.entry(x)
        if entry is not None:
            found[id(x)] = entry[0]
        return entry is not None

    if recorded(model):
        key = found[id(model)]
        return _updated(context, model, key, alias), {key: ""}
    paths, leaves_, treedef = flatten(model, recorded)
    written: dict[int, str] = {}
    for i, leaf in enumerate(leaves_):
        if type(leaf) not in MARK_TYPES and id(leaf) in found:
            key = found[id(leaf)]
            leaves_[i] = _updated(context, leaf, key, alias)
            written[key] = dotted(paths[i])
    return unflatten(treedef, leaves_), written


def _write(model: Any, context: _Context) -> Any:
    """`model` with the recorded updates of its modules. The outermost call also checks
    that no update is lost; a nested one leaves that to it; a detached one reports what
    it wrote to the call it is detached from."""
    new, written = _written(model, context)
    records = context.records
    if context.nested:
        now = records.tick()
        for key in written:
            records.delivered[key] = now
        return new
    lost = [
        m
        for key, (m, _) in records.updates.items()
        if key not in written and key not in records.delivered
    ]
    if lost:
        raise RuntimeError(
            f"{type(lost[0]).__name__} updated its state inside `treenn.apply` but is "
            "not part of the model passed to it (created or replaced during the call), "
            "so the update would be lost."
        )
    if context.detached_from is not None:
        root = leaves(model)[1]
        context.detached_from.reports.extend(
            _Report(path, records.names.get(key, "a layer"), root) for key, path in written.items()
        )
    return new


def _updated(context: _Context, module: Any, key: int, alias: bool) -> Any:
    values = context.records.updates[key][1]
    state = state_of(module)
    # Keep each field's status mark (a Buffer stays a Buffer).
    changes = {name: marked_like(state[name], value) for name, value in values.items()}
    new = replace_fields(module, **changes)
    if alias and context.nested:
        context.records.aliases[id(new)] = (new, key)
    return new


# -- claiming what a detached apply returned ----------------------------------------------


def _stateful(x: Any) -> bool:
    """A module holding buffers (state) in its own fields."""
    return isinstance(x, eqx.Module) and any(type(v) is Buffer for v in state_of(x).values())


def _returned_model(candidate: Any, like: Any) -> Any:
    """`candidate`, or an element of it (a tuple, list or dict), with `like`'s structure."""
    if candidate is None:
        return None
    want = leaves(like)[1]
    options = [candidate]
    if type(candidate) in (tuple, list):
        options += list(candidate)
    elif type(candidate) is dict:
        options += list(candidate.values())
    for option in options:
        if option is not None and leaves(option)[1] == want:
            return option
    return None


def _claim(context: _Context, model: Any, back: Any) -> None:
    """Record, for each module of `model` that holds buffers, the buffers of its
    counterpart in `back` (the model returned out of the transform) that are new."""
    reports = context.reports
    if back is None:
        raise RuntimeError(_unclaimed(context, reports[0]))
    paths, mine, _ = flatten(model, _stateful)
    _, theirs, _ = flatten(back, _stateful)
    claimed: set[str] = set()
    for path, m_sub, b_sub in zip(paths, mine, theirs):
        if type(m_sub) in MARK_TYPES or not _stateful(m_sub):
            continue
        key = context.key(m_sub)
        own = state_of(m_sub)
        entry = context.records.updates.get(key)
        current = entry[1] if entry is not None else {}
        values = {n: unmarked(v) for n, v in state_of(b_sub).items() if type(v) is Buffer}
        # Updated again after the transform, called directly on the module it returned.
        after = context.entry(b_sub)
        if after is not None:
            values.update(after[1])
            context.records.delivered[after[0]] = context.records.tick()
        new = {
            n: v
            for n, v in values.items()
            if v is not unmarked(own[n]) and (n not in current or v is not current[n])
        }
        if not new:
            continue
        where = dotted(path)
        if context.undelivered(key):
            raise RuntimeError(
                f"{context.records.names.get(key, type(m_sub).__name__)} at "
                f"{where!r} updated its running statistics both directly and inside "
                f"{_TRANSFORMS}, from the same starting statistics, so one update would be "
                "lost. Call it through `treenn.apply` each time and pass the model each "
                "call returns on to the next (into the transform and out of it)."
            )
        context.put(key, m_sub, type(m_sub).__name__, new)
        claimed.add(where)
    root = leaves(model)[1]
    comparable = [r for r in reports if r.root == root]
    missing = [r for r in comparable if r.path not in claimed]
    if missing or (not comparable and not claimed):
        raise RuntimeError(_unclaimed(context, (missing or reports)[0], returned=True))
    context.reports = []


def _unclaimed(context: _Context, report: _Report, returned: bool = False) -> str:
    where = f"{report.what} at {report.path!r}" if report.path else report.what
    head = (
        f"{where} (in the model given to a `treenn.apply` inside {_TRANSFORMS}) updated "
        "its running statistics in the model that apply returned, "
    )
    if context.kind == "loss":
        if returned:
            return head + (
                "but the model the `treenn.train_step` loss returned does not hold them "
                "(it is not the model the transform gave back), so they would be lost. "
                "Pass the model each `treenn.apply` returns on: out of the transform, "
                f"then {_RETURN_FROM_LOSS}."
            )
        return head + (
            "and the `treenn.train_step` loss did not return that model, so they would "
            f"be lost: {_RETURN_FROM_LOSS}."
        )
    return head + (
        "which the enclosing `treenn.apply` cannot see: a transform opened inside the "
        "model's `__call__` cannot pass state out as a side effect, so they would be "
        "lost. Keep the layer outside the transform, or switch it to evaluation mode "
        "with `nn.eval_mode` (`pin=True` under `treenn.train_step`). A transform around "
        "the whole model works: call `treenn.apply` inside it and use the model it "
        f"returns (in a `treenn.train_step` loss, {_RETURN_FROM_LOSS})."
    )
