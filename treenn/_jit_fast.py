"""The measured fast paths of `treenn.jit`: the same calls as `_jit.py`, less Python.

`_jit.py` says what a call means; nothing here changes a result. `TREENN_JIT_FAST=0` in
the environment (read at import; `_jit._set_fast` in tests) makes `treenn.jit` take the
plain path alone, and the jit tests run both ways. Each mechanism is kept because a
same-run measurement shows it pays (`tests/benchmarks/README.md`; `_set_mechanisms` turns
one off for that measurement):

1. **The memo** (`memo`). An argument this function returned or received on its previous
   call, such as the model and optimiser state of a training loop, is recognised by
   identity and not flattened again. Only trees whose every node is immutable
   (`immutable`) qualify: a list or dict may have changed in place since. The memo holds
   weak references to the tree's Equinox modules and arrays only inside them, and drops
   a record when one of them dies: it never keeps anything alive.
2. **Tuple guards** (`tuple_guards`). A tuple (an optimiser state) cannot be weakly
   referenced: it is recognised by its items, through straight-line code generated once
   per structure (`_tuple_code`).
3. **Output builders** (`builders`). `treedef.unflatten` calls back into Python once per
   Equinox module; code generated once per output structure (`_Writer`) builds the whole
   tree instead: containers as literals, modules as `object.__new__` plus one
   `__dict__`, exactly what Equinox's own unflatten produces.
4. **Shared subtrees** (`shared_subtrees`). An output subtree made of an input's arrays,
   in order, with that input subtree's structure (a frozen backbone passed through) is
   that input subtree: it comes back as the input's own object, immutable as it is,
   instead of being rebuilt (`_shared_builder`, code generated once per trace). Only
   from inputs the memo holds, which hold no NumPy array (`jax.jit` would return those
   as JAX arrays).

Generated functions keep their source, as Equinox's `_module/_flatten.py` does: each has a
`__source__` and a filename `<treenn generated ...>` registered in `linecache` (while the
function lives), so a debugger or a traceback shows real code.
"""

from __future__ import annotations

import itertools
import linecache
import threading
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import equinox as eqx
import jax.tree_util as jtu

from ._caches import Cache
from ._jit import _ARRAY, _HOST, Jitted, Structure, _Out
from ._status import ALL_MARKS, is_array

_MAX_STRUCTURES = 4096  # interned structures per function, least recently used dropped
_MECHANISMS = {"memo": True, "tuple_guards": True, "builders": True, "shared_subtrees": True}


def _set_mechanisms(**on: bool) -> dict[str, bool]:
    """Switch single fast paths for `treenn.jit` functions made afterwards (benchmarks:
    each mechanism measured with and without it); returns the previous settings."""
    previous = dict(_MECHANISMS)
    for name, value in on.items():
        if name not in _MECHANISMS:
            raise ValueError(f"no fast path {name!r}; there are {sorted(_MECHANISMS)}")
        _MECHANISMS[name] = bool(value)
    return previous


# -- what may be remembered ----------------------------------------------------------------


def _immutable_node(kind: type) -> bool:
    # Node types known not to change in place. Marks are immutable structure (a pin is a
    # mark around a Python bool): a pinned model is remembered like any other. A list,
    # dict, OrderedDict or user's pytree class may change in place: flattened each call.
    return (
        issubclass(kind, (tuple, eqx.Module, jtu.Partial))
        or kind is type(None)
        or kind in ALL_MARKS
    )


def immutable(treedef: Any) -> bool:
    """Whether every node of `treedef` is of an immutable type: the one place that
    decides what the memo may recognise and what a builder may build once for all."""
    stack = [treedef]
    while stack:
        node = stack.pop()
        data = node.node_data()
        if data is not None and not _immutable_node(data[0]):
            return False
        stack.extend(node.children())
    return True


# How a remembered tree is recognised (its *plan*, from its structure): `_ITEM` an array
# leaf (any array fits: arrays are leaves), `_NONE` None, an int n a weakly referable node
# (an Equinox module) with n arrays, `(type, items, sizes)` a tuple (immutable, not weakly
# referable: it is its items), `None` not recognisable.
_ITEM: Any = object()
_NONE: Any = object()


def _plan(treedef: Any, statics: tuple[Any, ...], tuples: bool, depth: int = 0) -> Any:
    data = treedef.node_data()
    if data is None:
        return _ITEM if statics[0] is None else None
    kind = data[0]
    if kind is type(None):
        return _NONE
    if issubclass(kind, tuple):
        if not tuples or depth >= 8:
            return None
        items, sizes, start = [], [], 0
        for child in treedef.children():
            part = statics[start : start + child.num_leaves]
            item = _plan(child, part, tuples, depth + 1)
            if item is None:
                return None
            items.append(item)
            sizes.append(sum(1 for s in part if s is None))
            start += child.num_leaves
        return (kind, tuple(items), tuple(sizes))
    if kind.__weakrefoffset__:
        return sum(1 for s in statics if s is None)
    return None


class FastStructure(Structure):
    """A `Structure` interned per function, with what the fast paths need: how to
    recognise a tree of it next call (`plan`, and for a tuple the generated `guard` and
    `collect`) and its generated builder."""

    __slots__ = ("plan", "guard", "collect", "_builder")

    def prepare(self, tuples: bool, builders: bool) -> None:
        """Computed once, when the structure is interned."""
        plan = None
        if immutable(self.treedef):
            plan = _plan(self.treedef, self.statics, tuples)
        self.plan = None if plan is _ITEM or plan is _NONE else plan
        code: tuple[Any, Any] = _tuple_code(plan) if type(plan) is tuple else (None, None)
        self.guard, self.collect = code
        self._builder: Callable[[Sequence[Any]], Any] | None = None if builders else self.build

    def build_fast(self, arrays: Sequence[Any]) -> Any:
        """`build`, through code generated for this structure on its first output."""
        build = self._builder
        if build is None:
            try:
                build = _builder(self.treedef, self.statics)
            except RecursionError:  # a very deep model: JAX rebuilds it
                build = self.build
            self._builder = build
        return build(arrays)


# -- generated code --------------------------------------------------------------------------

_COUNT = itertools.count()


def _generated(source: str, what: str, namespace: dict[str, Any], name: str) -> Any:
    """`exec` `source` and return its function `name`, with its source kept for
    debuggers (`__source__`, and `linecache` while the function lives)."""
    filename = f"<treenn generated {what} {next(_COUNT)}>"
    exec(compile(source, filename, "exec"), namespace)
    fn = namespace[name]
    fn.__source__ = source
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    weakref.finalize(fn, linecache.cache.pop, filename, None)
    return fn


class _Weak:
    """A weakly referenced node of a remembered tree, and its arrays. The arrays are the
    node's own: holding them while the node lives keeps nothing alive longer."""

    __slots__ = ("ref", "arrays")

    def __init__(self, ref: Any, arrays: Sequence[Any]):
        self.ref = ref
        self.arrays = arrays


def _tuple_code(plan: Any) -> tuple[Callable[..., Any], Callable[..., bool]]:
    """For a tuple plan, straight-line code (a call per item would be a measurable share
    of a call): `guard(x, arrays, forget)`, the `_Weak` records of `x`'s weakly
    referable nodes, and `collect(x, guards, out)`, whether `x` is still the tree they
    were made for (same tuple types and lengths, the same nodes, arrays where arrays
    were), its arrays appended to `out`."""
    consts: dict[str, Any] = {"_Weak": _Weak, "_ref": weakref.ref, "_is_array": is_array}
    access: list[str] = []  # `guard`'s lines
    check: list[str] = []  # `collect`'s lines
    weak: list[str] = []

    def walk(plan: Any, var: str, start: int) -> None:
        kind, items, sizes = plan
        consts[f"_k{len(consts)}"] = kind
        check.append(
            f"    if type({var}) is not _k{len(consts) - 1} or len({var}) != {len(items)}:"
        )
        check.append("        return False")
        for index, (item, size) in enumerate(zip(items, sizes)):
            name = f"x{len(access)}"
            access.append(f"    {name} = {var}[{index}]")
            check.append(f"    {name} = {var}[{index}]")
            if type(item) is int:
                check.append(f"    w = g[{len(weak)}]")
                check.append(f"    if w.ref() is not {name}:")
                check.append("        return False")
                check.append("    out.extend(w.arrays)")
                weak.append(f"_Weak(_ref({name}, forget), a[{start}:{start + size}])")
            elif item is _ITEM:
                check.append(f"    if not _is_array({name}):")
                check.append("        return False")
                check.append(f"    out.append({name})")
            elif item is _NONE:
                check.append(f"    if {name} is not None:")
                check.append("        return False")
            else:
                walk(item, name, start)
            start += size

    walk(plan, "x", 0)
    guard = (
        "def guard(x, a, forget):\n"
        + "".join(line + "\n" for line in access)
        + f"    return ({''.join(w + ', ' for w in weak)})\n"
    )
    collect = "def collect(x, g, out):\n" + "".join(line + "\n" for line in check)
    collect += "    return True\n"
    return (
        _generated(guard, "tuple guard", dict(consts), "guard"),
        _generated(collect, "tuple check", dict(consts), "collect"),
    )


class _Writer:
    """Writes `build(a)` for one tree structure: one line per node that holds arrays."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {
            "_new": object.__new__,
            "_set": object.__setattr__,
            "_tuple_new": tuple.__new__,
        }
        self.leaf = 0
        # `shared(treedef, first leaf)`: an expression for an input's own subtree that
        # this subtree is, or `None`.
        self.shared: Callable[[Any, int], str | None] | None = None

    def const(self, value: Any) -> str:
        name = f"_c{len(self.consts)}"
        self.consts[name] = value
        return name

    def var(self, expr: str) -> str:
        name = f"_n{len(self.lines)}"  # unique: one line per variable at most
        self.lines.append(f"    {name} = {expr}")
        return name

    def node(self, treedef: Any, leaves: list[str]) -> str:
        """Emit code for `treedef`; `leaves` holds the leaf expressions in order."""
        data = treedef.node_data()
        if data is None:
            expr = leaves[self.leaf]
            self.leaf += 1
            return expr
        start = self.leaf
        own = leaves[start : start + treedef.num_leaves]
        if self.shared is not None:
            taken = self.shared(treedef, start)
            if taken is not None:
                self.leaf += treedef.num_leaves
                return taken
        if not any(leaf.startswith("a") for leaf in own) and immutable(treedef):
            # No array below: the subtree is the same (immutable) object every call.
            self.leaf += treedef.num_leaves
            return self.const(treedef.unflatten([self.consts[leaf] for leaf in own]))
        kind, aux = data
        children = [self.node(child, leaves) for child in treedef.children()]
        if kind is type(None):
            return "None"
        if kind is tuple:
            return self.var("(" + "".join(c + ", " for c in children) + ")")
        if kind is list:
            return self.var("[" + ", ".join(children) + "]")
        if kind is dict:
            items = ", ".join(f"{self.const(k)}: {c}" for k, c in zip(aux, children))
            return self.var("{" + items + "}")
        if kind in ALL_MARKS:  # as its unflatten does
            return self.var(f"{self.const(kind)}({children[0]})")
        if issubclass(kind, tuple) and hasattr(kind, "_fields"):
            items = "".join(c + ", " for c in children)
            return self.var(f"_tuple_new({self.const(kind)}, ({items}))")
        if issubclass(kind, eqx.Module):
            names = _child_names(treedef)
            if names is not None:
                template = treedef.unflatten([None] * treedef.num_leaves)
                rest = {k: v for k, v in template.__dict__.items() if k not in names}
                state = self.var(f"{self.const(rest)}.copy()")
                for name, child in zip(names, children):
                    self.lines.append(f"    {state}[{name!r}] = {child}")
                module = self.var(f"_new({self.const(kind)})")
                self.lines.append(f"    _set({module}, '__dict__', {state})")
                return module
        # Unknown node type: let JAX rebuild this subtree.
        subtree = ", ".join(leaves[start : self.leaf])
        return self.var(f"{self.const(treedef)}.unflatten([{subtree}])")


def _child_names(treedef: Any) -> list[str] | None:
    """Field names of an Equinox module's dynamic children, in flatten order."""
    template = treedef.unflatten([None] * treedef.num_leaves)
    pairs, _ = jtu.tree_flatten_with_path(template, is_leaf=lambda x: x is not template)
    names = []
    for path, _ in pairs:
        if len(path) != 1 or not isinstance(path[0], jtu.GetAttrKey):
            return None
        names.append(path[0].name)
    if len(names) != len(treedef.children()):
        return None
    return names


def _builder(treedef: Any, statics: tuple[Any, ...]) -> Callable[[Sequence[Any]], Any]:
    """A function `build(a)` that returns `treedef` filled with the leaves `statics`,
    its `None` entries (the array places) taken from the list `a`, in order."""
    writer = _Writer()
    leaves = []
    index = 0
    for leaf in statics:
        if leaf is None:
            leaves.append(f"a{index}")
            index += 1
        else:
            leaves.append(writer.const(leaf))
    result = writer.node(treedef, leaves)
    unpack = "".join(f"a{i}, " for i in range(index))
    head = f"def build(a):\n    ({unpack}) = a\n" if index else "def build(a):\n"
    source = head + "".join(line + "\n" for line in writer.lines) + f"    return {result}\n"
    return _generated(source, "build", dict(writer.consts), "build")


def _subtrees(
    treedef: Any, statics: tuple[Any, ...], expr: str, table: dict[Any, str], first: int = 0
) -> bool:
    """Record in `table` every immutable subtree of an input that holds arrays and can be
    reached by field or index access: `(first array index, number of arrays, treedef,
    statics) -> access expression`. Returns whether `treedef` is immutable."""
    data = treedef.node_data()
    if data is None:
        return True
    kind, children = data[0], treedef.children()
    steps: list[str] | None = None
    if issubclass(kind, eqx.Module):
        names = _child_names(treedef)
        steps = None if names is None else [f".__dict__[{name!r}]" for name in names]
    elif issubclass(kind, tuple):
        steps = [f"[{index}]" for index in range(len(children))]
    whole = _immutable_node(kind)
    leaf, array = 0, first
    for index, child in enumerate(children):
        part = statics[leaf : leaf + child.num_leaves]
        if steps is not None:
            whole = _subtrees(child, part, expr + steps[index], table, array) and whole
        else:
            whole = immutable(child) and whole
        leaf += child.num_leaves
        array += sum(1 for s in part if s is None)
    count = array - first
    if whole and count:
        table.setdefault((first, count, treedef, statics), expr)
    return whole


class _Shared:
    """An output tree whose unchanged subtrees (a frozen backbone) are the input's own:
    `build(arrays, inputs)` takes them from the inputs, building only the rest."""

    __slots__ = ("structure", "build")

    def __init__(self, structure: FastStructure, build: Callable[..., Any]):
        self.structure = structure
        self.build = build


def _shared_builder(
    structure: FastStructure, sources: list[Any], tables: list[dict[Any, str] | None]
) -> _Shared | None:
    """For one output part: `sources[p]` says where its leaf `p` comes from (`None` a
    static, `_COMPUTED`, or `(input k, array index j)` an input array passed through).
    A subtree whose arrays are input k's arrays j0, j0+1, ... in order, and whose tree
    structure and static leaves are those of input k's subtree there, *is* that subtree
    (both immutable): it is taken from the input instead of being rebuilt. `None` when
    no subtree is shared."""
    needs: set[int] = set()

    def shared(treedef: Any, start: int) -> str | None:
        here = [s for s in sources[start : start + treedef.num_leaves] if s is not None]
        if not here or any(s is _COMPUTED for s in here):
            return None
        k, first = here[0]
        table = tables[k]
        if table is None or any(s != (k, first + n) for n, s in enumerate(here)):
            return None
        statics = structure.statics[start : start + treedef.num_leaves]
        expr = table.get((first, len(here), treedef, statics))
        if expr is None:
            return None
        needs.add(k)
        return f"_i{k}{expr}"

    writer = _Writer()
    writer.shared = shared
    leaves = [f"a{i}" for i in range(sum(1 for s in structure.statics if s is None))]
    it = iter(leaves)
    leaves = [next(it) if s is None else writer.const(s) for s in structure.statics]
    try:
        result = writer.node(structure.treedef, leaves)
    except RecursionError:  # a very deep model: rebuilt as usual
        return None
    if not needs:
        return None
    fallback = writer.const(structure.build_fast)
    head = ["def build(a, i):"]
    head += [f"    _i{k} = i[{k}]" for k in sorted(needs)]
    # An input that may hold NumPy arrays (or came as a new object) is not shared from.
    head += [f"    if _i{k} is None:\n        return {fallback}(a)" for k in sorted(needs)]
    unpack = "".join(f"{leaf}, " for leaf in leaves if leaf.startswith("a"))
    if unpack:
        head.append(f"    ({unpack}) = a")
    source = "\n".join(head) + "\n" + "".join(f"{line}\n" for line in writer.lines)
    source += f"    return {result}\n"
    return _Shared(structure, _generated(source, "shared build", dict(writer.consts), "build"))


_COMPUTED: Any = object()


# -- the memo ------------------------------------------------------------------------------


class _Known:
    """A tree this function received or returned, recognised by identity next call.
    It holds arrays only inside its weakly referenced nodes, and is dropped as soon as
    one of them dies."""

    __slots__ = ("guard", "structure", "token")

    def __init__(self, guard: Any, structure: FastStructure, token: object):
        self.guard = guard
        self.structure = structure
        self.token = token


def _still(known: _Known, x: Any, out: list[Any]) -> bool:
    """Whether `x` is the remembered tree; its arrays are appended to `out`."""
    guard = known.guard
    if type(guard) is _Weak:
        if guard.ref() is not x:
            return False
        out.extend(guard.arrays)
        return True
    collect = known.structure.collect
    assert collect is not None
    return bool(collect(x, guard, out))


_NOTHING: Mapping[int, Any] = types.MappingProxyType({})  # no tree remembered


class FastJitted(Jitted[Any, Any]):
    """`Jitted` with the fast paths: the memo, tuple guards, generated builders."""

    def __init__(self, fn: Callable[..., Any], donate: str):
        super().__init__(fn, donate)
        self._structures: dict[FastStructure, FastStructure] = Cache(maxsize=_MAX_STRUCTURES)
        self._memo: dict[int, _Known] = {}
        self._lock = threading.Lock()
        self._weakself = weakref.ref(self)
        self._remembers = _MECHANISMS["memo"]
        self._tuples = _MECHANISMS["tuple_guards"]
        self._builders = _MECHANISMS["builders"]
        self._shares = _MECHANISMS["shared_subtrees"] and self._remembers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        memo: dict[int, _Known] = {}
        # `self._memo` is shared: other threads replace it and weakref callbacks pop from
        # it at any moment. Only single lookups are atomic, so it is read here, once, and
        # never handed to anything that iterates it (as a runtime type checker would).
        known = self._memo if self._remembers else _NOTHING
        inputs: list[Any] = []  # the arguments the memo holds (no NumPy array), else None
        jitted, lists = self._prepare(args, kwargs, known, memo, inputs)
        computed, out = self._run(jitted, lists)

        def make(how: Any, arrays: Sequence[Any]) -> Any:
            if type(how) is _Shared:
                structure = how.structure
                tree = how.build(arrays, inputs)
            elif type(how) is FastStructure:
                structure = how
                tree = how.build_fast(arrays)
            else:
                return how.build(arrays)
            if structure.plan is not None and self._remembers:
                self._remember(memo, tree, structure, arrays)
            return tree

        result = out.build(computed, lists, make)
        self._memo = memo  # this call's objects only: the previous ones are forgotten
        return result

    def _partition(
        self,
        objects: tuple[Any, ...],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        known: Any = _NOTHING,
        memo: dict[int, _Known] | None = None,
        inputs: list[Any] | None = None,
    ) -> tuple[list[list[Any]], list[Any]]:
        """As `Jitted._partition`, recognising the trees of `known` (the previous call's
        memo, `{id: _Known}`) by identity; those to recognise next call go to `memo`, and
        to `inputs` each object the memo holds (`None` for the others).
        (`known` is typed `Any`: a runtime type checker would iterate a `Mapping`, while
        other threads change it.)"""
        lists, structures = [], []
        for x in objects:
            if is_array(x):
                lists.append([x])
                structures.append(_ARRAY)
                continue
            hit = known.get(id(x))
            arrays: list[Any] = []
            structure: FastStructure
            if hit is not None and memo is not None and _still(hit, x, arrays):
                memo[id(x)] = hit
                structure = hit.structure
            else:
                arrays, split = self._split(x, args, kwargs)
                structure = cast(FastStructure, split)
                if (
                    memo is not None
                    and structure.plan is not None
                    and self._remembers
                    and not any(isinstance(a, _HOST) for a in arrays)  # mutable in place
                ):
                    self._remember(memo, x, structure, arrays)
            lists.append(arrays)
            structures.append(structure)
            if inputs is not None:
                inputs.append(x if memo is not None and id(x) in memo else None)
        return lists, structures

    def _describe(
        self, out: Any, inputs: list[list[Any]], structures: Sequence[Any]
    ) -> tuple[list[Any], Any]:
        """As `Jitted._describe`, with the output trees that share subtrees with the
        inputs built by `_shared_builder`."""
        computed, description = super()._describe(out, inputs, structures)
        if not self._shares:
            return computed, description
        source = {id(x): (k, j) for k, arrays in enumerate(inputs) for j, x in enumerate(arrays)}
        sources = [
            None if not is_array(leaf) else source.get(id(leaf), _COMPUTED)
            for leaf in jtu.tree_leaves(out)
        ]
        tables: list[dict[Any, str] | None] = []
        for k, structure in enumerate(structures):
            table: dict[Any, str] | None = None
            if structure is not _ARRAY and inputs[k]:
                table = {}
                try:
                    _subtrees(structure.treedef, structure.statics, "", table)
                except RecursionError:
                    table = None
            tables.append(table)
        treedef: Any = jtu.tree_structure(out)
        parts, start = [], 0
        for (get, how), part in zip(
            description.parts, treedef.children() if description.is_tuple else [treedef]
        ):
            end = start + part.num_leaves
            if type(how) is FastStructure:
                shared = _shared_builder(how, sources[start:end], tables)
                how = how if shared is None else shared
            parts.append((get, how))
            start = end
        return computed, _Out(description.forwarded, tuple(parts), description.is_tuple)

    def _structure(self, treedef: Any, statics: tuple[Any, ...]) -> FastStructure:
        """The one `FastStructure` of this function for this structure."""
        new = FastStructure(treedef, statics)
        structure = self._structures.get(new)
        if structure is None:
            new.prepare(self._tuples, self._builders)
            with self._lock:
                structure = self._structures.get(new)
                if structure is None:
                    structure = self._structures[new] = new
        return structure

    def _remember(
        self, memo: dict[int, _Known], x: Any, structure: FastStructure, arrays: Sequence[Any]
    ) -> None:
        key, token, owner = id(x), object(), self._weakself

        def forget(_: Any) -> None:
            # `x` (or an item of it) died: drop the record, and with it the arrays.
            jitted = owner()
            if jitted is not None:
                known = jitted._memo.get(key)
                if known is not None and known.token is token:
                    jitted._memo.pop(key, None)

        guard: Any
        if structure.guard is None:  # a weakly referable node (an Equinox module)
            guard = _Weak(weakref.ref(x, forget), arrays)
        else:
            guard = structure.guard(x, arrays, forget)
        memo[key] = _Known(guard, structure, token)
