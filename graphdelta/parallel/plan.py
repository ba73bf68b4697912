"""``graphdelta.parallelize(model)``: tensor parallelism for the hybrid families, by heads.

Per layer (as vLLM and SGLang shard these models; transformers' own TP plans gather the GDN
projections and replicate KDA, so every rank would compute every linear-attention head):
- GDN: in-projections column parallel (Qwen3-Next's ``in_proj_qkvz``/``in_proj_ba`` hold one
  block per key head, so a contiguous split keeps whole GVA groups; Qwen3.5's and
  OLMo-Hybrid's separate projections split one by one, ``in_proj_qkv`` per q/k/v segment);
  the conv split per q/k/v segment; ``A_log``/``dt_bias`` by head; the gated norm is per head
  (local); the output projection row parallel, then one all-reduce;
- KDA: q/k/v, ``b``, the forget gate's and output gate's full-width projections column
  parallel, their low-rank ``*_a_proj`` replicated, ``A_log``/``dt_bias`` by head;
- attention: q (with Qwen's output gate, interleaved per head) column parallel; K/V heads
  split, or copied when there are fewer KV heads than ranks; OLMo-Hybrid's q/k norms over
  all heads sum their squares over the ranks; MLA: the latent projection replicated,
  ``kv_b_proj`` and the per-head output gate by head;
- MLP and MoE: gate/up (the experts' fused ``gate_up_proj`` half by half) column parallel,
  down row parallel, the block's output summed once (routed and shared experts alike);
- embeddings, norms, routers and the LM head replicated.

Per layer this is two all-reduces, as in Megatron (OLMo-Hybrid's attention layers two more,
for their q and k norms). H and HV must divide by the number of ranks, so every rank has the
same GVA ratio.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from graphdelta.parallel.styles import ReduceOutput, RowSplit, SetAttributes, Split, SplitNorm
from graphdelta.runtime.forward import decoder_parts
from graphdelta.runtime.layers import ModelSpec, layer_kinds

COLUMN = {"weight": 0, "bias": 0}


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """What ``parallelize`` did to a model (``model._graphdelta_tp``)."""

    mesh: DeviceMesh
    spec: ModelSpec  # the local one: this rank's heads, what its cache holds

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    @property
    def size(self) -> int:
        return self.mesh.size()


def tensor_parallel(model: Any) -> TensorParallel | None:
    """The ``TensorParallel`` record of a parallelized model (or of what compile returned)."""
    from graphdelta.runtime.runner import unwrap

    return getattr(unwrap(model), "_graphdelta_tp", None)


def _divides(what: str, count: int, ranks: int) -> None:
    if count % ranks:
        raise ValueError(f"{what}={count} does not divide over {ranks} ranks: tensor parallelism splits it "
                         f"evenly (choose a number of ranks that divides it)")


def _kv_copies(kv: int, ranks: int, where: str) -> tuple[int, int]:
    """(local KV heads, ranks holding each one)."""
    if kv % ranks == 0:
        return kv // ranks, 1
    if ranks % kv == 0:
        return 1, ranks // kv
    raise ValueError(f"{where}: num_key_value_heads={kv} and {ranks} ranks: one must divide the other "
                     "(KV heads are split, or copied when there are fewer than ranks)")


def _gdn(m: nn.Module, n: int) -> dict[str, ParallelStyle]:
    _divides(f"{type(m).__name__}: linear_num_key_heads", m.num_k_heads, n)
    _divides(f"{type(m).__name__}: linear_num_value_heads", m.num_v_heads, n)
    qkv = [m.key_dim, m.key_dim, m.value_dim]
    plan = {"conv1d": Split(COLUMN, qkv), "": Split({"A_log": 0, "dt_bias": 0})}
    if hasattr(m, "in_proj_qkvz"):  # Qwen3-Next: one block per key head
        plan.update({"in_proj_qkvz": Split(COLUMN), "in_proj_ba": Split(COLUMN), "out_proj": RowSplit()})
    elif hasattr(m, "in_proj_qkv"):  # Qwen3.5
        plan.update({"in_proj_qkv": Split(COLUMN, qkv), "in_proj_z": Split(COLUMN), "in_proj_b": Split(COLUMN),
                     "in_proj_a": Split(COLUMN), "out_proj": RowSplit()})
    else:  # OLMo-Hybrid
        plan.update({p: Split(COLUMN) for p in ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj")})
        plan["o_proj"] = RowSplit()
    out = "out_proj" if hasattr(m, "out_proj") else "o_proj"
    plan[out + "#reduce"] = ReduceOutput()
    plan["#heads"] = SetAttributes(num_k_heads=m.num_k_heads // n, num_v_heads=m.num_v_heads // n,
                                   key_dim=m.key_dim // n, value_dim=m.value_dim // n, conv_dim=m.conv_dim // n)
    return plan


def _kda(m: nn.Module, n: int) -> dict[str, ParallelStyle]:
    _divides(f"{type(m).__name__}: linear_num_heads", m.num_heads, n)
    gate = m.forget_gate
    plan = {p: Split(COLUMN) for p in ("q_proj", "k_proj", "v_proj", "b_proj")}
    plan["conv1d"] = Split(COLUMN, [m.qkv_dim] * 3)
    plan["forget_gate"] = Split({"A_log": [d for d, s in enumerate(gate.A_log.shape) if s == gate.num_heads][0],
                                 "dt_bias": 0})
    plan["forget_gate.f_proj" if hasattr(gate, "f_proj") else "forget_gate.f_b_proj"] = Split(COLUMN)
    plan["g_proj" if hasattr(m, "g_proj") else "g_b_proj"] = Split(COLUMN)
    plan["o_proj"] = RowSplit()
    plan["o_proj#reduce"] = ReduceOutput()
    plan["#heads"] = SetAttributes(num_heads=m.num_heads // n, qkv_dim=m.qkv_dim // n, conv_dim=m.conv_dim // n)
    plan["forget_gate#heads"] = SetAttributes(num_heads=gate.num_heads // n, qkv_dim=gate.qkv_dim // n)
    return plan


def _attention(m: nn.Module, n: int, config: Any) -> tuple[dict[str, ParallelStyle], int]:
    """The plan of a full-attention layer and its local KV heads (what the cache holds)."""
    name = type(m).__name__
    heads = config.num_attention_heads
    _divides(f"{name}: num_attention_heads", heads, n)
    plan: dict[str, ParallelStyle] = {"o_proj": RowSplit(), "o_proj#reduce": ReduceOutput()}
    if hasattr(m, "kv_a_proj_with_mqa"):  # MLA: one shared latent (replicated), heads from kv_b_proj
        plan["q_proj" if getattr(m, "q_lora_rank", None) is None else "q_b_proj"] = Split(COLUMN)
        plan["kv_b_proj"] = Split(COLUMN)
        if hasattr(m, "g_proj"):
            plan["g_proj"] = Split(COLUMN)
        plan["#heads"] = SetAttributes(num_heads=heads // n)
        return plan, 1
    kv_local, copies = _kv_copies(config.num_key_value_heads, n, name)
    plan.update({"q_proj": Split(COLUMN), "k_proj": Split(COLUMN, copies=copies),
                 "v_proj": Split(COLUMN, copies=copies)})
    if m.q_norm.weight.shape[0] != m.head_dim:  # OLMo-Hybrid: q and k normed over all heads
        plan["q_norm"] = SplitNorm()
        plan["k_norm"] = SplitNorm(copies=copies)
    plan["#heads"] = SetAttributes(num_key_value_groups=heads // n // kv_local)
    return plan, kv_local


def _mlp(m: nn.Module, n: int) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {"#reduce": ReduceOutput()}
    dense = [m] if hasattr(m, "down_proj") else []
    experts = getattr(m, "experts", None)
    if experts is not None:
        _divides(f"{type(experts).__name__}: moe_intermediate_size", experts.intermediate_dim, n)
        inter = experts.intermediate_dim
        plan["experts"] = Split({"gate_up_proj": 1}, [inter, inter])
        plan["experts#down"] = Split({"down_proj": 2})
        plan["experts#heads"] = SetAttributes(intermediate_dim=inter // n)
        for shared in ("shared_expert", "shared_experts"):
            if getattr(m, shared, None) is not None:
                dense.append(getattr(m, shared))
    elif not dense:
        raise TypeError(f"{type(m).__name__} is neither an MLP (gate/up/down_proj) nor a MoE block with experts")
    for d in dense:
        prefix = "" if d is m else next(k for k, v in m.named_children() if v is d) + "."
        _divides(f"{type(d).__name__}: intermediate_size", d.gate_proj.out_features, n)
        plan.update({prefix + "gate_proj": Split(COLUMN), prefix + "up_proj": Split(COLUMN),
                     prefix + "down_proj": RowSplit()})
        if hasattr(d, "intermediate_size"):
            plan[prefix + "#heads"] = SetAttributes(intermediate_size=d.intermediate_size // n)
    return plan


def _join(module: str, key: str) -> str:
    """A plan key under ``module``: ``"conv1d"`` -> ``module.conv1d``, ``""`` -> ``module``,
    ``"#heads"`` -> ``module#heads`` (a further style on the module itself)."""
    return module + ("." + key if key and not key.startswith("#") else key)


def build_plan(model: nn.Module, ranks: int) -> tuple[dict[str, ParallelStyle], ModelSpec]:
    """The plan (module path -> style; ``path#tag`` lets one module take several styles) and
    the local ``ModelSpec``. Raises, naming the numbers, before anything is changed."""
    config = model.config
    spec = ModelSpec.from_config(config)
    base, _ = decoder_parts(model)
    prefix = next(k for k, v in model.named_modules() if v is base)
    plan: dict[str, ParallelStyle] = {}
    kv_local = spec.attention.kv_heads
    text = getattr(config, "text_config", None) or config
    for i, (layer, kind) in enumerate(zip(base.layers, layer_kinds(config))):
        path = f"{prefix}.layers.{i}."
        if kind == "linear":
            name = "linear_attn" if hasattr(layer, "linear_attn") else "self_attn"
            m = getattr(layer, name)
            part = _kda(m, ranks) if hasattr(m, "forget_gate") else _gdn(m, ranks)
        else:
            name = "self_attn"
            part, kv_local = _attention(layer.self_attn, ranks, text)
        for module, styles in ((name, part), ("mlp", _mlp(layer.mlp, ranks))):
            plan.update({_join(path + module, k): v for k, v in styles.items()})
    lin = spec.linear
    local = dataclasses.replace(
        spec, attention=dataclasses.replace(spec.attention, kv_heads=kv_local),
        linear=dataclasses.replace(lin, heads=lin.heads // ranks, conv_dim=lin.conv_dim // ranks))
    return plan, local


def default_mesh() -> DeviceMesh:
    """A 1-D mesh over every rank of the initialized process group, on this rank's device."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("graphdelta.parallelize needs an initialized process group: call "
                           "torch.distributed.init_process_group (torchrun sets its environment) or pass mesh=")
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("tp",))


def parallelize(model: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard a transformers hybrid model (Qwen3-Next, Qwen3.5 dense and MoE, Kimi Linear,
    OLMo-Hybrid, Bailing-Hybrid) in place over a 1-D ``mesh`` (default: every rank of the
    process group), by heads; returns it. Every rank must call it, on the same model.

    Afterwards the model runs as before on every rank (its forward sums the row-parallel
    projections over the ranks), ``graphdelta.compile`` compiles each rank's part, and
    ``graphdelta.generate`` runs on a cache of this rank's heads. The parameters may be on
    the meta device (``graphdelta.parallel.load`` fills them in)."""
    mesh = default_mesh() if mesh is None else mesh
    if mesh.ndim != 1:
        raise ValueError(f"graphdelta.parallelize takes a 1-D device mesh, got {mesh.ndim} dimensions")
    if getattr(model, "_graphdelta_tp", None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already parallelized over {model._graphdelta_tp.size} ranks")
    plan, local = build_plan(model, mesh.size())
    # Every style is checked on its module before any applies, so a refusal leaves the model as
    # it was. "path#tag" names a further style on the same module.
    targets = {}
    split: dict[int, str] = {}  # parameter id -> the module path that splits it
    for path, style in plan.items():
        target = path.split("#")[0].rstrip(".")
        targets[path] = module = model.get_submodule(target) if target else model
        if hasattr(style, "check"):
            style.check(module, mesh.size())
        for name in getattr(style, "dims", ()):
            param = getattr(module, name, None)
            if param is not None and split.setdefault(id(param), f"{target}.{name}") != f"{target}.{name}":
                raise ValueError(f"{target}.{name} is the same parameter as {split[id(param)]}: a shared "
                                 "parameter cannot be split twice")
    # Applying cannot fail on the model's numbers any more, but may on memory or Ctrl-C: then
    # every touched module gets its state back, so the model is as it was, and usable.
    saved = {id(m): (m, {k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(m).items()})
             for m in targets.values()}
    try:
        for path, style in plan.items():
            parallelize_module(targets[path], mesh, style)
    except BaseException:
        for module, state in saved.values():
            module.__dict__.clear()
            module.__dict__.update(state)
        raise
    model._graphdelta_tp = TensorParallel(mesh, local)
    return model


def local_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
