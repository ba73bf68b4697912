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

import contextlib
import inspect
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

from graphdelta import hf, passes, progress
from graphdelta.passes import discover
from graphdelta.passes.causal_mask import causal_sdpa
from graphdelta.passes.norm_gate import unflatten_norm_gates
from graphdelta.passes.plan import Plan
from graphdelta.report import GraphLog
from graphdelta.runtime.layers import text_config

BACKENDS = ("inductor", "aot_eager", "eager")
RECOMPILE_LIMIT = 64


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    # Multimodal wrappers (Qwen3.5's *ForConditionalGeneration) keep it in their text config.
    return getattr(text_config(config), "vocab_size", None) if config is not None else None


def default_probe(model: nn.Module, length: int = 20) -> None:
    """A causal LM probe: prefill into a cache, continue it, one decode step, prefill without a
    cache. Together these reach every gated-delta and conv function of a transformers hybrid."""
    vocab = _vocab_size(model)
    if vocab is None:
        raise ValueError(f"{type(model).__name__} has no config.vocab_size to build token ids from")
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    cache = hf.cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    out = model(input_ids=ids[:, :5], **{cache: hf.output_cache(out)}, use_cache=True)
    model(input_ids=ids[:, :1], **{cache: hf.output_cache(out)}, use_cache=True)
    model(input_ids=ids, use_cache=False)


def call_class(args: tuple, kwargs: dict) -> tuple:
    """What makes two calls of a model take different code paths, as far as their arguments
    tell: the structure of containers and objects, which arguments are None, the ranks and
    dtypes of tensors and which of their sizes are 1 (Dynamo specializes those too)."""

    def shape_of(x: Any, depth: int = 0) -> Any:
        if isinstance(x, torch.Tensor):
            return ("tensor", x.dim(), x.dtype, tuple(s == 1 for s in x.shape))
        if depth > 3:
            return type(x).__name__
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, tuple(shape_of(i, depth + 1) for i in x))
        if isinstance(x, dict):
            return ("dict", tuple(sorted((repr(k), shape_of(v, depth + 1)) for k, v in x.items())))
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, float)):
            return type(x).__name__
        return type(x).__name__

    return shape_of(args), shape_of(kwargs)


def inner_backend(name: str) -> Callable[..., Callable]:
    """The backend that compiles the rewritten graph: inductor (with the CPU decompositions of
    graphdelta's norm and conv, so that it fuses them with their neighbours), aot_eager or eager.

    torch.compile hands a custom backend its ``mode`` and ``options`` as keyword arguments;
    inductor takes them as the config patches ``torch.compile`` itself would apply
    (``mode="reduce-overhead"``: CUDA graphs), the other backends take none (``compile``
    refuses them by name before any work)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any], mode: str | None = None,
                      options: dict[str, Any] | None = None) -> Callable:
        if name == "inductor":
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx
            from torch._inductor.decomposition import select_decomp_table

            from graphdelta.ops import inductor_decompositions

            table = {**select_decomp_table(), **inductor_decompositions()}
            patches = {**(list_mode_options(mode) if mode else {}), **(options or {})}
            return compile_fx(gm, example_inputs, config_patches=patches, decompositions=table)
        if name == "aot_eager":
            return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)
        return gm.forward

    return compile_graph


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
    calls; its other attributes (``device``, ``dtype``, ``generation_config``, ...) read through.

    Without a probe (a model with no ``config.vocab_size`` and no ``probe=``), the first call of
    each kind (``call_class``) runs the model eagerly with its calls recorded, which is that
    call's answer; recognition then covers what it reached, and later calls of that kind run
    compiled. The first decode step of a hand-written model is found that way."""

    def __init__(self, model: nn.Module, plan: Plan, graph_log: GraphLog, dynamic: bool | None,
                 compile_kwargs: dict[str, Any], *, lazy: bool, warn: bool, backend: str = "inductor"):
        super().__init__()
        self._backend = backend
        self.model = model
        self.plan = plan
        self.graph_log = graph_log
        self.patch = discover.LayerPatch()
        self._lazy, self._warn, self._calls_seen = lazy, warn, set()
        self._kinds_run: set = set()  # call_class of the calls run compiled (progress for the first)
        # The root's forward is called through this cell: the model's own (bound) forward, or
        # the patched one when the root itself calls a replaced function. Not ``model.forward``:
        # ``generate`` points the module's ``forward`` at this wrapper for its duration, and the
        # compiled code must not follow it there.
        self._root = [model.forward]
        root = self._root

        def call_model(*args, **kwargs):
            return root[0](*args, **kwargs)

        self._compiled = torch.compile(call_model, backend=graph_log, dynamic=dynamic, **compile_kwargs)
        self._signature = inspect.signature(model.forward)
        self._warned_grad = False
        self._install(plan)

    def _install(self, plan: Plan) -> None:
        self.plan = plan
        for lp in plan.layers:
            if lp.module_forward is not None:
                self.patch.set_forward(lp.layer.module, lp.module_forward)
            elif lp.replacements or lp.layer.module in self.patch.forwards:
                self.patch.update(lp.layer, lp.replacements)
        self._root[0] = self.patch.forwards.get(self.model, self.model.forward)
        self.graph_log.layer_classes = tuple({type(lp.layer.module) for lp in plan.layers if lp.regions or lp.fallbacks})

    def _probe_with(self, args: tuple, kwargs: dict) -> Any:
        """Run this call eagerly with every callee recorded, recognize again, and return its result."""
        result = []
        old = self.plan
        start = time.perf_counter()
        with progress.phase(f"probing and recognizing a new kind of call to {type(self.model).__name__}") as shown:
            plan = passes.run(Plan(self.model, lambda m: result.append(m(*args, **kwargs)), old.state_layout,
                                   discovered=old.discovered, submodules=old.submodules, cache=old.cache),
                              on_pass=shown.note)
        plan.seconds = old.seconds + time.perf_counter() - start
        known = set(old.warnings)
        _report(plan, warn=self._warn, known=known)
        self._install(plan)
        return result[0]

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
        kind = call_class(args, kwargs)  # (the lazy probe's key, and the progress line's)
        if self._lazy:
            if kind not in self._calls_seen:
                self._calls_seen.add(kind)
                return self._probe_with(args, kwargs)
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
        first = kind not in self._kinds_run  # most likely compiles: say so before going silent
        shown = contextlib.nullcontext()
        if first:
            how_long = " (inductor: about a minute on CPU for the tiny model)" if self._backend == "inductor" else ""
            shown = progress.phase(f"compiling the first call of this kind{how_long}")
        # specialize_float: the models' float arguments are constants (scales, eps); traced as
        # tensors they made inductor give up on the first graph and Dynamo trace it again
        # (TensorifyScalarRestartAnalysis: 70 s -> 49 s for the demo's first call, cold).
        with shown as phase, self.patch.applied(), causal_sdpa(own_positions), \
                torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, specialize_float=True):
            self.graph_log.note = phase.note if first else None
            try:
                out = self._compiled(*args, **kwargs)
            finally:
                self.graph_log.note = None
        self._kinds_run.add(kind)  # (a call that failed, or was interrupted, compiles again)
        return out

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
            recurrent state in the kernels and in the cache of every replaced layer. A cache
            passed to the compiled model holds each layer's state in that layout, which can be
            the transpose of what the model's own code stores (``explain`` lists each layer's
            layout; ``plan.layers[i].flipped`` marks those): with transformers' models, pass ``"kv"``
            (their own) to read states out of the cache as the original model writes them.
        dynamic: passed to ``torch.compile``; True gives one graph for all prompt lengths.
        backend: ``"inductor"``, ``"aot_eager"`` or ``"eager"``: what compiles the rewritten graph.
        probe: ``probe(model)`` runs a few eager forward calls that reach every code path to be
            compiled. Default: prefill with and without a cache and a decode step on token ids,
            for a model with ``config.vocab_size``; for any other module, its own calls (the
            first call of each kind runs eagerly, recorded, and is recognized).
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
    mode = compile_kwargs.get("mode")
    if mode is not None:
        from torch._inductor import list_mode_options

        if mode not in list_mode_options():
            raise ValueError(f"mode must be one of {sorted(list_mode_options())}, got {mode!r}")
        if backend != "inductor" and mode != "default":
            raise ValueError(f"mode={mode!r} configures inductor; backend={backend!r} takes no mode")
    if compile_kwargs.get("options") and backend != "inductor":
        raise ValueError(f"options configure inductor; backend={backend!r} takes none")
    if probe is None and _vocab_size(model) is None:
        # No probe to build: the first call of each kind is the probe (see CompiledModel). That
        # call runs the original functions on whatever state the caller holds, so states stay
        # in the layout those functions read.
        if state_layout == "vk":
            raise ValueError(
                f"state_layout='vk' needs a probe: {type(model).__name__} has no config.vocab_size, so its own "
                "calls are probed as they come, running the original functions on the caller's states, which "
                "read kv. Pass probe=fn(model) that reaches every call, or use state_layout='kv'.")
        plan = Plan(model, probe, "kv")
        return CompiledModel(model, plan, GraphLog(inner_backend(backend), rewrite=unflatten_norm_gates),
                             dynamic, compile_kwargs, lazy=True, warn=warn, backend=backend)
    start = time.perf_counter()
    with progress.phase(f"probing and recognizing {type(model).__name__}") as shown:
        plan = passes.run(Plan(model, probe or default_probe, state_layout), on_pass=shown.note)
    plan.seconds = time.perf_counter() - start
    _report(plan, warn=warn)
    return CompiledModel(model, plan, GraphLog(inner_backend(backend), rewrite=unflatten_norm_gates),
                         dynamic, compile_kwargs, lazy=False, warn=warn, backend=backend)


def _report(plan: Plan, warn: bool, known: set[str] = frozenset()) -> None:
    """Fill ``plan.warnings`` (every function kept as written, and why) and warn about new ones."""
    for lp in plan.layers:
        for callee, why, family in lp.fallbacks:
            fn = getattr(lp.layer.callees.get(callee), "fn", None)
            name = callee if fn is None or fn.__name__ == callee else f"{callee} ({fn.__qualname__})"
            plan.warnings.append(f"graphdelta: layer {lp.path or type(plan.model).__name__}: {name} kept as "
                                 f"written ({family}: {why})")
    if not any(lp.regions for lp in plan.layers):
        plan.warnings.append(
            f"graphdelta: no linear-attention region recognized in {type(plan.model).__name__}; it runs "
            "unchanged under torch.compile"
        )
    if warn:
        for message in plan.warnings:
            if message not in known:
                warnings.warn(message, stacklevel=3)


def explain(compiled: CompiledModel) -> str:
    """What ``compile`` did to each layer and every graph compiled so far (``graphdelta.report``)."""
    from graphdelta.report import explain as _explain

    return _explain(compiled)
