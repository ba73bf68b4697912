"""Complete explanation: every node of a traced function gets a role, or the function runs as
written.

A recognizer traces a candidate function to aten ops (``recognize.trace``) and hands the graph
to ``explain`` with the roles of its tensor arguments (q, k, v, g, beta, state for the gated
delta rule) and the ``Rules`` of its family. ``explain`` propagates, node by node, which
arguments each value depends on (its *deps*; none: a data-independent value such as a mask or
an index), and gives every node a role from the grammar below. The first node that fits no
rule makes the function a non-match, reported with the node, its op and the user's source line.

The grammar (what any recognized function may contain):

- **layout**: ops that move or copy values without computing (view, reshape, permute,
  transpose, expand, slice, select, cat, stack, split, pad with zeros, clone, casts that widen or
  round to the dtype of an argument (the model's precision), the scatters a functionalized in-place store becomes), and indexing by data-independent
  indices;
- **constants**: tensors made from shapes alone (zeros, ones, arange, eye, full), and any
  computation on them (masks, iotas), except random numbers;
- **masking** of data by a data-independent mask (``tril``, ``masked_fill``, ``where``);
- **arithmetic** the family allows on data (``Rules.arithmetic``: add, mul, matmul, sum, the
  triangular solve, ...), and **restricted** ops allowed only on some arguments
  (``Rules.restricted``: for the gated delta rule, ``exp`` and ``cumsum`` only of the gate,
  ``rsqrt`` only of q or k alone);
- **literals**: every float literal must be one the family explains (``Rules.floats``: 0, ±1,
  ±inf, the scale ``K ** -0.5``, an l2norm's eps, ...). Integer literals that no shape
  explains are returned as ``Explanation.constants``: the numerical check must then reach past
  each of them.

Everything else on data is refused: comparisons and everything piecewise (clamp, min/max,
abs, relu, floor, ``where`` on a data-dependent condition, ``nan_to_num``, ``.item()``),
casts that round or truncate, data-dependent indexing, random numbers, and ops the family does
not compute. Each of these can be the identity on the inputs a numerical check draws and not
on others, which is why no numerical check alone can clear them.

Mutation of an argument is refused unless the family updates that argument in place
(``Rules.mutable``: the conv state of a conv update).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import operator
import sys
from typing import Any, Callable

import torch
from torch import fx

Deps = frozenset  # of argument roles

LAYOUT = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "view_copy", "permute", "permute_copy",
    "transpose", "transpose_copy", "t", "t_copy", "expand", "expand_copy", "unsqueeze",
    "unsqueeze_copy", "squeeze", "squeeze_copy", "clone", "contiguous", "alias", "alias_copy",
    "detach", "detach_copy", "slice", "slice_copy", "select", "select_copy", "split", "split_copy",
    "split_with_sizes", "split_with_sizes_copy", "unbind", "unbind_copy", "chunk", "narrow",
    "narrow_copy", "cat", "stack", "constant_pad_nd", "repeat", "repeat_interleave", "index_select",
    "index", "_to_copy", "copy", "select_scatter", "slice_scatter", "index_put", "flip", "roll",
    "movedim", "lift_fresh_copy", "getitem", "unfold", "diagonal", "diagonal_copy", "diag_embed",
    "_linalg_check_errors", "gather",
})
FACTORIES = frozenset({
    "zeros", "ones", "full", "empty", "empty_strided", "empty_permuted", "zeros_like", "ones_like",
    "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided",
    "arange", "eye", "scalar_tensor", "linspace",
})
COMPARISONS = frozenset({
    "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or", "logical_xor",
    "bitwise_not", "bitwise_and", "bitwise_or", "bitwise_xor", "isnan", "isinf", "isfinite",
    "isneginf", "isposinf", "any", "all", "is_nonzero",
})
RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "exponential", "poisson")
# ops whose index arguments must not depend on data (they select by position)
INDEXED = {"index_select": (2,), "index": (1,), "index_put": (1,), "gather": (2,), "scatter": (2,)}
WIDENING = {torch.float32, torch.float64}
# slices end at "everything": the largest index Python and aten use for that
OPEN_END = {sys.maxsize, 2**63 - 1, -sys.maxsize - 1}


@dataclasses.dataclass(frozen=True)
class Rules:
    """What one family of functions may compute; see the module docstring."""

    family: str  # "the gated delta rule"
    arithmetic: frozenset[str]  # allowed on data, whatever it depends on
    # op -> check(node, deps of an argument) -> a role, or None to refuse
    restricted: dict[str, Callable[[fx.Node, Callable[[Any], Deps]], str | None]]
    floats: Callable[[float, str, Deps], bool]  # is this literal explained (value, op, deps)?
    role_of: Callable[[str, Deps], str]  # the role of an allowed arithmetic node
    mutable: frozenset[str] = frozenset()  # arguments the function may update in place


@dataclasses.dataclass
class Unexplained:
    """The first node no rule explains."""

    node: str
    op: str
    where: str  # the user's source line ("file.py:12 in fn"), or ""
    why: str

    def __str__(self) -> str:
        at = f" at {self.where}" if self.where else ""
        return f"{self.why}: node {self.node} ({self.op}){at}"


@dataclasses.dataclass
class Explanation:
    roles: collections.Counter[str]  # role -> nodes
    deps: dict[fx.Node, Deps]
    cumsum_axes: set[int]  # sizes of the axes data was cumulatively summed over
    triangles: set[int]  # sizes of the square triangular masks (tril / triu)
    constants: set[int]  # integer literals no shape explains
    mutated: set[str]  # arguments updated in place
    ops: collections.Counter[str]  # op name -> nodes
    masked: list[Deps]  # what each masked_fill / where with a data-independent mask masks

    def summary(self) -> str:
        return ", ".join(f"{role} {n}" for role, n in self.roles.most_common())


def op_name(node: fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(target, "__name__", str(target))


def _literals(args: Any) -> list[int | float]:
    out = []
    for a in args if isinstance(args, (list, tuple)) else [args]:
        if isinstance(a, (list, tuple)):
            out.extend(_literals(a))
        elif isinstance(a, bool) or a is None:
            continue
        elif isinstance(a, (int, float)):
            out.append(a)
    return out


def shape_integers(dims: dict[str, int], chunk: int | None, length: int) -> set[int]:
    """Integers a shape explains: the dims (and the chunk count, padded length and padding),
    products of up to four of them, positions up to the chunk size or chunk count, multiples of
    the chunk size up to the padded length, and small integers."""
    base = set(dims.values()) | {length}
    span = max(dims.values(), default=1)
    if chunk:
        n = -(-length // chunk)
        base |= {chunk, n, n * chunk, n * chunk - length}
        span = max(chunk, n) + 1
        base |= set(range(0, n * chunk + 1, chunk))
    base.discard(0)
    products = set(base)
    for r in (2, 3, 4):
        products |= {math.prod(c) for c in itertools.combinations_with_replacement(sorted(base), r)}
    small = set(range(-4, span + 2))
    return products | {-p for p in products} | small | OPEN_END


def explain(gm: fx.GraphModule, inputs: dict[str, str], rules: Rules, dims: dict[str, int],
            length: int, lines: dict[fx.Node, str] | None = None) -> Explanation | Unexplained:
    """Give every node of ``gm`` a role under ``rules``, or return the first that has none.

    Args:
        gm: a functionalized ``make_fx`` trace (``recognize.trace``).
        inputs: placeholder name -> argument role ("q", "g", ...); other placeholders are
            tensors with no role, which the function may hold but not compute with.
        dims: the named sizes of the traced call (B, T, H, K, ...), which explain integers.
        length: the traced sequence length.
        lines: node -> the user's source line, for messages.
    """
    lines = lines or {}
    deps: dict[fx.Node, Deps] = {}
    roles: collections.Counter[str] = collections.Counter()
    cumsum_axes: set[int] = set()
    triangles: set[int] = set()
    masked: list[Deps] = []
    literals: set[int] = set()
    mutated: set[str] = set()

    def refuse(node: fx.Node, why: str) -> Unexplained:
        return Unexplained(node.name, str(node.target), lines.get(node, ""), why)

    def shape(node: Any) -> tuple:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        return tuple(val.shape) if isinstance(val, torch.Tensor) else ()

    # casts may widen, or round to a dtype the function was given (the model's own precision,
    # which the op rounds its output to as well); any other narrowing is refused
    input_dtypes = {n.meta["val"].dtype for n in gm.graph.nodes
                    if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            role = inputs.get(node.target)
            deps[node] = Deps({role or f"unroled:{node.target}"})
            continue
        if node.op == "output":
            continue
        if node.op == "get_attr":  # a tensor constant built inside the function
            value = getattr(gm, node.target)
            if not isinstance(value, torch.Tensor) or value.numel() > 1:
                return refuse(node, "reads a constant tensor that is not an argument")
            if value.numel() == 1 and value.is_floating_point():
                v = value.item()
                if not (float(v).is_integer() or rules.floats(v, "constant", Deps())):
                    return refuse(node, f"constant {v!r} is not one {rules.family} explains")
            deps[node] = Deps()
            roles["constant"] += 1
            continue
        name = op_name(node)
        arg_deps = [deps[a] for a in node.all_input_nodes]
        data = Deps().union(*arg_deps)
        unroled = sorted(d.removeprefix("unroled:") for d in data if d.startswith("unroled:"))
        if unroled and name not in LAYOUT:
            return refuse(node, f"computes with tensor argument {unroled[0]!r}, which has no role in {rules.family}")

        # in-place updates (functionalization leaves only those of arguments, as a final copy_)
        if name.endswith("_"):
            dest = node.args[0] if node.args else None
            if isinstance(dest, fx.Node) and dest.op == "placeholder":
                role = inputs.get(dest.target)
                if role not in rules.mutable:
                    return refuse(node, f"updates its argument {role or dest.target!r} in place")
                mutated.add(role)
                deps[node] = data
                roles["state update"] += 1
                continue
            if isinstance(dest, fx.Node) and dest.op == "get_attr":
                return refuse(node, "updates a tensor that is not an argument (a global)")

        if any(r in name for r in RANDOM):
            return refuse(node, "draws random numbers")

        if name in INDEXED:
            for i in INDEXED[name]:
                idx = node.args[i] if i < len(node.args) else None
                idx_nodes = [x for x in (idx if isinstance(idx, (list, tuple)) else [idx]) if isinstance(x, fx.Node)]
                if any(deps[x] for x in idx_nodes):
                    return refuse(node, "indexes by positions computed from data")

        if data and name in COMPARISONS:
            return refuse(node, "compares data (a data-dependent branch or threshold)")

        # literals: floats must be explained; integers are collected for the numerical check
        for lit in _literals(list(node.args) + list(node.kwargs.values())):
            # a float past 2**53 counts as a float: no length or index is that large (finfo.min fills)
            if isinstance(lit, float) and (math.isinf(lit) or math.isnan(lit) or not lit.is_integer() or abs(lit) > 2**53):
                if not rules.floats(lit, name, data):
                    return refuse(node, f"constant {lit!r} is not one {rules.family} explains")
            else:
                literals.add(int(lit))

        if not data or name in FACTORIES:  # a data-independent value: masks, iotas, buffers
            deps[node] = Deps()
            role = "buffer" if name in FACTORIES else "mask" if name in COMPARISONS or name in ("tril", "triu") else "constant"
            if name in ("tril", "triu") and len(shape(node)) >= 2 and shape(node)[-1] == shape(node)[-2]:
                triangles.add(shape(node)[-1])
            roles[role] += 1
            continue

        if name in ("where",):
            cond = node.args[0]
            if not isinstance(cond, fx.Node) or deps[cond]:
                return refuse(node, "selects by a condition computed from data")
            masked.append(data)
            deps[node] = data
            roles["causal mask"] += 1
            continue
        if name == "masked_fill":
            mask = node.args[1]
            if isinstance(mask, fx.Node) and deps[mask]:
                return refuse(node, "masks by a condition computed from data")
            masked.append(deps[node.args[0]])
            deps[node] = deps[node.args[0]]
            roles["causal mask"] += 1
            continue
        if name == "_to_copy":
            dtype = node.kwargs.get("dtype")
            if dtype is not None and dtype not in WIDENING | input_dtypes:
                return refuse(node, f"casts data to {dtype}, which rounds or truncates it")
        if name == "constant_pad_nd" and len(node.args) > 2 and node.args[2] not in (0, 0.0):
            return refuse(node, f"pads data with {node.args[2]!r} (only zeros are explained)")
        if name in LAYOUT:
            deps[node] = data
            roles["layout"] += 1
            continue
        if name in rules.restricted:
            role = rules.restricted[name](node, lambda x: deps[x] if isinstance(x, fx.Node) else Deps())
            if role is None:
                kinds = ", ".join(sorted(data))
                return refuse(node, f"{name} of a value computed from {kinds} is not part of {rules.family}")
            if name == "cumsum" and shape(node.args[0]):
                cumsum_axes.add(shape(node.args[0])[node.args[1]])
            deps[node] = data
            roles[role] += 1
            continue
        if name in rules.arithmetic:
            if name in ("tril", "triu") and len(shape(node)) >= 2 and shape(node)[-1] == shape(node)[-2]:
                triangles.add(shape(node)[-1])
            deps[node] = data
            roles[rules.role_of(name, data)] += 1
            continue
        kinds = ", ".join(sorted(data))
        return refuse(node, f"{name} on a value computed from {kinds} is not part of {rules.family}")

    ops = collections.Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")
    return Explanation(roles, deps, cumsum_axes, triangles, literals, mutated, ops, masked)


def unexplained_integers(found: Explanation, dims: dict[str, int], chunk: int | None, length: int) -> set[int]:
    """The integer literals of ``found`` that no shape of the traced call explains."""
    explained = shape_integers(dims, chunk, length)
    return {c for c in found.constants if c not in explained}
