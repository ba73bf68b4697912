"""graphdelta: a compiler for hybrid linear-attention language models.

- ``graphdelta.compile(model)`` / ``graphdelta.explain(compiled)``: the compiler (``passes/``);
- ``graphdelta.generate(model, prompts, ...)``: generation over the hybrid cache (``runtime/``);
- ``graphdelta.parallelize(model)`` / ``graphdelta.load(path, mesh=...)``: tensor parallelism on
  torch.distributed, by heads (``parallel/``);
- ``graphdelta.ops``: the gated delta rule (GDN, KDA), its decode step, the causal conv1d and the
  gated RMSNorm, as
  graph-visible ``torch.ops.graphdelta.*`` ops with signatures close to fla's;
- ``graphdelta.fla``: fla 0.6.0's gated delta rule and KDA calls, unchanged, on those ops;
- ``graphdelta.reference``: the token-by-token reference every implementation is checked against;
- ``graphdelta.testing`` / ``python -m graphdelta.fuzz``: hypothesis strategies and the checker.
"""
from graphdelta import ops, reference
from graphdelta.ops import (
    causal_conv1d,
    causal_conv1d_update,
    chunk_gated_delta_rule,
    chunk_kda,
    fused_recurrent_gated_delta_rule,
    gated_delta_rule_decode,
    gated_rms_norm,
    recurrent_gated_delta_rule,
)
from graphdelta.compiler import compile, explain  # noqa: A004 - graphdelta.compile(model)
from graphdelta.runtime.generate import generate
import torch.distributed as _dist

if _dist.is_available():  # tensor parallelism (graphdelta/parallel/) needs torch.distributed
    from graphdelta.parallel import load, parallelize
from graphdelta import assets, hf

hf.quiet_kernel_fallbacks()

__version__ = "0.1.0"

__all__ = [
    "compile",
    "explain",
    "generate",
    "parallelize",
    "load",
    "assets",
    "ops",
    "reference",
    "chunk_gated_delta_rule",
    "chunk_kda",
    "recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "gated_delta_rule_decode",
    "causal_conv1d",
    "causal_conv1d_update",
    "gated_rms_norm",
]
