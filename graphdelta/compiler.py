"""``graphdelta.compile(model)``: torch.compile with the linear-attention layers running on
graphdelta ops.

Pipeline (the stages live in ``graphdelta.passes``, in the order of ``passes.PASSES``):

1. discover, on a short eager probe, which Python functions each layer calls and with what;
2. recognize, from the traced graph of each function and a numerical check against
   ``graphdelta.reference``, the chunked gated delta rule, its token recurrence and the
   causal conv1d, and among the leaf submodules the gated RMSNorm; build a drop-in that
   calls the graphdelta op;
3. choose the recurrent-state layout per layer;
4. trace the whole model with Dynamo (``dynamic=True``) while the layers call the drop-ins,
   so each region is one op node and the chunk count is no longer a guard: one graph serves
   every prompt length; hand the graph to the backend (inductor by default, which on CPU
   receives the decompositions of the gated RMSNorm and of a prompt's conv1d so that it
   fuses them with their neighbours). Before that, each CPU gated RMSNorm gets its gate in
   the layout the gate was produced in (``passes.norm_gate``). While tracing,
   transformers' masking code keeps SDPA's causal path where eager would
   (``passes.causal_mask``).

Whatever is not recognized, or not confirmed numerically, runs as written, with a warning
naming the layer. ``graphdelta.explain(compiled)`` reports what happened.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import re
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

from graphdelta import passes
from graphdelta.passes import discover
from graphdelta.passes.causal_mask import causal_sdpa
from graphdelta.passes.norm_gate import unflatten_norm_gates
from graphdelta.passes.plan import Plan
from graphdelta.runtime.layers import text_config

BACKENDS = ("inductor", "aot_eager", "eager")
RECOMPILE_LIMIT = 64
SIZE_ONE_GUARDS = (r"^2 <= .*size\(\)\[\d+\]$", r"size mismatch at index \d+\. expected 1,")
LEFTOVER_OPS = ("solve_triangular",)  # what the chunked pipeline leaves when it is not fused


@dataclasses.dataclass
class GraphRecord:
    """One graph Dynamo handed to the backend."""

    index: int
    reason: str  # why it was compiled: first call, or the guard that failed
    nodes: int
    graphdelta_ops: dict[str, int]
    leftovers: dict[str, int]  # ops that a full fusion removes (solve_triangular, cumsum)
    matmuls: int  # matmul / bmm / einsum nodes in linear-attention layers (a fused layer has none)
    inputs: list[str]
    attention: dict[str, int] = dataclasses.field(default_factory=dict)  # SDPA calls: "unmasked" / "masked"
    seconds: float = 0.0
    norm_gates: int = 0  # gated norms given their gate unflattened (passes/norm_gate.py)
    compile_id: str = ""  # Dynamo's "frame/compile" id, as its guard failures name the graph


def _guard_text(failure: str) -> str:
    """Dynamo's first line for a failed guard (``guard  # user code  # file.py:N in fn (...)``)
    as the guard, where the model's code made it, and a gloss of the guards users meet most."""
    parts = [p.strip() for p in failure.splitlines()[0].split("  # ")]
    text = parts[0]
    where = [m.group(0) for p in parts[1:] if (m := re.search(r"[\w./-]+\.py:\d+ in \w+", p))]
    if where:
        text += f" (at {where[-1]})"
    if hint := re.search(r"\(HINT: [^)]*\)", failure):
        text += f" {hint.group(0)}"
    if "kwargs" in parts[0]:
        text += ": keyword arguments differ from that graph's"
    elif any(re.search(pattern, parts[0]) for pattern in SIZE_ONE_GUARDS):
        text += ": a size of 1 gets graphs of its own (Dynamo specializes sizes 0 and 1)"
    return text


class GraphLog:
    """A backend in front of ``inner`` that records every graph it is asked to compile."""

    def __init__(self, inner: str, layer_classes: tuple[type, ...] = ()):
        if inner not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {inner!r}")
        self.inner = inner
        # the linear-attention layers' classes; matmuls elsewhere (rotary embeddings) don't count
        self.layer_classes = layer_classes
        self.graphs: list[GraphRecord] = []
        self.pending = ""

    def _in_layer(self, node: torch.fx.Node) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return any(cls in self.layer_classes for _, cls in stack.values())

    def _reason(self, compile_id: Any) -> str:
        if self.pending:
            reason, self.pending = self.pending, ""
            return reason
        if not self.graphs:
            return "first call"
        # Dynamo logs why each cache entry of the frame missed, prefixed by the entry's compile
        # id ("3/1: ..."), when it recompiles the frame. Only this model's entries count (other
        # compiled models share transformers' code objects); each one's latest failure is why
        # it missed this time.
        ours = {g.compile_id for g in self.graphs}
        frame = f"{compile_id.frame_id}/" if compile_id is not None else None
        latest: dict[str, str] = {}
        for reasons in torch._dynamo.utils.guard_failures.values():
            for r in reasons:
                entry, _, text = str(r).strip().partition(": ")
                if frame and entry.startswith(frame) and entry in ours:
                    latest[entry] = _guard_text(text)
        if not latest:
            return "new code path (different branch or graph break)"
        order = sorted(latest, key=lambda e: int(e.rsplit("/", 1)[1]))
        return "guard failed: " + " | ".join(f"{e}: {latest[e]}" for e in order)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        ops: collections.Counter[str] = collections.Counter()
        leftovers: collections.Counter[str] = collections.Counter()
        attention: collections.Counter[str] = collections.Counter()
        matmuls = 0
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = str(getattr(node.target, "__name__", node.target))
            qualified = str(node.target)
            if "graphdelta" in qualified:
                ops[qualified.replace("graphdelta.", "graphdelta::").split("graphdelta::")[-1].split(".")[0]] += 1
            if any(s in name for s in LEFTOVER_OPS):
                leftovers[name] += 1
            if name in ("matmul", "bmm", "mm", "einsum", "__matmul__") and self._in_layer(node):
                matmuls += 1
            if name == "scaled_dot_product_attention":
                masked = (len(node.args) > 3 and node.args[3] is not None) or node.kwargs.get("attn_mask") is not None
                attention["masked" if masked else "unmasked"] += 1
        inputs = [
            str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs[:6]
        ]
        compile_id = torch._guards.CompileContext.current_compile_id()
        record = GraphRecord(len(self.graphs), self._reason(compile_id), len(gm.graph.nodes), dict(ops),
                             dict(leftovers), matmuls, inputs, dict(attention), compile_id=str(compile_id or ""))
        self.graphs.append(record)
        start = time.perf_counter()
        record.norm_gates = unflatten_norm_gates(gm)
        try:
            if self.inner == "inductor":
                from torch._inductor.compile_fx import compile_fx

                from torch._inductor.decomposition import select_decomp_table

                from graphdelta.ops import inductor_decompositions

                table = {**select_decomp_table(), **inductor_decompositions()}
                compiled = compile_fx(gm, example_inputs, decompositions=table)
            elif self.inner == "aot_eager":
                compiled = torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)
            else:
                compiled = gm.forward
        except Exception as e:
            # Dynamo may catch this and trace the frame again (e.g. to specialize a size):
            # the next record then says why.
            message = (str(e).strip().splitlines() or [""])[0][:160]
            record.reason += f"; backend gave up ({type(e).__name__}: {message})"
            self.pending = f"retrace after the backend gave up on graph {record.index} ({type(e).__name__})"
            raise
        finally:
            record.seconds = time.perf_counter() - start
        return compiled


def default_probe(model: nn.Module, length: int = 20) -> None:
    """A causal LM probe: prefill into a cache, continue it, one decode step, prefill without a
    cache. Together these reach every gated-delta and conv function of a transformers hybrid."""
    config = getattr(model, "config", None)
    # Multimodal wrappers (Qwen3.5's *ForConditionalGeneration) keep it in their text config.
    vocab = getattr(text_config(config), "vocab_size", None) if config is not None else None
    if vocab is None:
        raise ValueError(
            f"{type(model).__name__} has no config.vocab_size; pass probe=fn(model) that runs a "
            "few representative forward calls (prefill with and without a cache, one decode step)"
        )
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    out = model(input_ids=ids, use_cache=True)
    out = model(input_ids=ids[:, :5], past_key_values=out.past_key_values, use_cache=True)
    model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    model(input_ids=ids, use_cache=False)


def _dense(x: Any) -> Any:
    """``x`` with row-major strides; ``contiguous()`` would keep the stride of a size-1 dim."""
    if not isinstance(x, torch.Tensor):
        return x
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= max(size, 1)
    return x if x.stride() == tuple(reversed(strides)) else x.clone(memory_format=torch.contiguous_format)


class CompiledModel(nn.Module):
    """The compiled model: ``forward`` runs the Dynamo-compiled model with its layers calling
    the graphdelta drop-ins. The wrapped model (``.model``) is left as it was outside these
    calls; its other attributes (``device``, ``dtype``, ``generation_config``, ...) read through."""

    def __init__(self, model: nn.Module, plan: Plan, backend: GraphLog, dynamic: bool | None,
                 compile_kwargs: dict[str, Any]):
        super().__init__()
        self.model = model
        self.plan = plan
        self.graph_log = backend
        forwards = {lp.layer.module: discover.forward_with(lp.layer, lp.replacements)
                    for lp in plan.layers if lp.replacements}
        forwards.update({lp.layer.module: lp.module_forward for lp in plan.layers if lp.module_forward})
        self.patch = discover.LayerPatch(forwards)
        # The bound forward, not the module: ``generate`` points the module's ``forward`` at
        # this wrapper for its duration, and the compiled code must not follow it there.
        self._compiled = torch.compile(model.forward, backend=backend, dynamic=dynamic, **compile_kwargs)
        self._signature = inspect.signature(model.forward)
        self._warned_grad = False

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and self._differentiable(args, kwargs):
            # graphdelta's ops have no backward, and AOT autograd traces one as soon as an input
            # requires grad. Such a call runs the model as it is, eagerly: torch 2.13's inductor
            # fails on the backward of these models' dynamic-shape graphs.
            if not self._warned_grad:
                self._warned_grad = True
                warnings.warn(
                    "graphdelta: gradients are enabled and the model has parameters (or inputs) that "
                    "require grad; graphdelta's ops have no backward, so this call runs the original "
                    "model, uncompiled. Call the model under torch.no_grad() or "
                    "torch.inference_mode() to run the compiled graphs.", stacklevel=2)
            return self.model(*args, **kwargs)
        # Dynamo guards on input strides: a prompt sliced out of a longer batch (ids[:, :n]) would
        # compile a graph of its own. Token ids, masks and positions are small to copy.
        args = tuple(_dense(a) for a in args)
        kwargs = {k: _dense(v) for k, v in kwargs.items()}
        # Prefill, cached prefill and decode are separate graphs of the same code objects, and
        # several compiled models share transformers' code: Dynamo's default recompile limit (8
        # per code object) would silently send later graphs to eager.
        try:
            own_positions = self._signature.bind_partial(*args, **kwargs).arguments.get("position_ids") is None
        except TypeError:  # let the model's own call raise it
            own_positions = False
        with self.patch.applied(), causal_sdpa(own_positions), \
                torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._compiled(*args, **kwargs)

    def _differentiable(self, args: tuple, kwargs: dict) -> bool:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in self.model.parameters())

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def __getattr__(self, name: str) -> Any:
        # nn.Module finds parameters, buffers and submodules. Anything else is read from the
        # wrapped model (device, dtype, generation_config, get_input_embeddings, ...), as code
        # written for a transformers model expects.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or name.startswith("__"):
                raise
            return getattr(super().__getattr__("model"), name)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """transformers' ``model.generate(...)`` (same arguments, same result), with every forward
        call it makes running through the compiled graphs. For serving many sequences, see
        ``graphdelta.runtime.generate``, which adds CUDA graphs and a fixed-address cache."""
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate method")
        own = self.model.__dict__.get("forward")

        def forward(*a, **k):
            return self.forward(*a, **k)

        # generate calls model(...), which reads model.forward, and it accepts only the keyword
        # arguments that forward's signature names (pixel_values, ...)
        forward.__signature__ = self._signature
        self.model.forward = forward
        try:
            return generate(*args, **kwargs)
        finally:
            if own is None:
                del self.model.forward
            else:
                self.model.forward = own


def compile(
    model: nn.Module,
    *,
    state_layout: str = "auto",
    dynamic: bool | None = True,
    backend: str = "inductor",
    probe: Callable[[nn.Module], None] | None = None,
    warn: bool = True,
    **compile_kwargs: Any,
) -> CompiledModel:
    """Compile a hybrid linear-attention model with graphdelta's ops in place of its
    gated-delta, token-recurrence and causal-conv1d functions.

    Args:
        model: a transformers ``Qwen3NextForCausalLM``, ``Qwen3_5ForCausalLM``,
            ``Qwen3_5MoeForCausalLM``, ``KimiLinearForCausalLM``, the image-text
            ``Qwen3_5[Moe]ForConditionalGeneration``, a later hybrid (``OlmoHybridForCausalLM``,
            ``BailingHybridForCausalLM``, ``Qwen4ExpForCausalLM``,
            ``Glm5NextForConditionalGeneration``), or any module whose layers call such
            functions.
        state_layout: ``"auto"`` (measured per device), ``"kv"`` or ``"vk"``: the layout of the
            recurrent state in the kernels and in the cache of every replaced layer.
        dynamic: passed to ``torch.compile``; True gives one graph for all prompt lengths.
        backend: ``"inductor"``, ``"aot_eager"`` or ``"eager"``: what compiles the rewritten graph.
        probe: ``probe(model)`` runs a few eager forward calls that reach every code path to be
            compiled (default: prefill with and without a cache and a decode step on token ids).
        warn: warn about every layer whose functions look like linear attention but stay as written.
        compile_kwargs: passed on to ``torch.compile`` (``fullgraph``, ``mode``, ...).

    Returns:
        A ``CompiledModel`` whose ``forward`` gives the logits and cache of ``model``, and whose
        ``generate`` is transformers' ``model.generate`` running on the compiled forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")
    if state_layout not in ("auto", "kv", "vk"):
        raise ValueError(f"state_layout must be 'auto', 'kv' or 'vk', got {state_layout!r}")
    if dynamic not in (True, False, None):
        raise ValueError(f"dynamic must be True, False or None, got {dynamic!r}")
    if backend not in BACKENDS:  # before the passes' probe runs the model
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    start = time.perf_counter()
    plan = passes.run(Plan(model, probe or default_probe, state_layout))
    plan.seconds = time.perf_counter() - start
    for lp in plan.layers:
        for callee, why, family in lp.fallbacks:
            plan.warnings.append(f"graphdelta: layer {lp.path}: {callee} kept as written ({family}: {why})")
    if not any(lp.regions for lp in plan.layers):
        plan.warnings.append(
            f"graphdelta: no linear-attention region recognized in {type(model).__name__}; it runs "
            "unchanged under torch.compile"
        )
    if warn:
        for message in plan.warnings:
            warnings.warn(message, stacklevel=2)
    layer_classes = tuple({type(lp.layer.module) for lp in plan.layers if lp.regions or lp.fallbacks})
    return CompiledModel(model, plan, GraphLog(backend, layer_classes), dynamic, compile_kwargs)


def explain(compiled: CompiledModel) -> str:
    """What ``compile`` did to each layer and every graph compiled so far (``graphdelta.report``)."""
    from graphdelta.report import explain as _explain

    return _explain(compiled)
