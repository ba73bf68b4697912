"""What each of the 2 processes of tests/test_parallel.py runs (gloo, one thread each): every
check records its numbers in a JSON file per rank, which the tests then read.

The single-process references are computed in each process before the process group is
joined, from the same seeds, so both ranks compare against the same numbers.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import models  # noqa: E402
from graphdelta.testing import peak_memory_growth  # noqa: E402

ALL = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "kimi_linear", "olmo_hybrid", "bailing_hybrid")
COMPILED = ("qwen3_next", "kimi_linear")  # one GDN and one KDA family through graphdelta.compile
PROMPTS = [models.tokens(7)[0].tolist(), models.tokens(12, seed=3)[0].tolist()]
NEW_TOKENS = 6


def families() -> list[str]:
    return [f for f in ALL if f in models.FAMILIES or models.newer_available(f)]


def build(family: str, **overrides) -> torch.nn.Module:
    """The tiny ``family`` model of tests/models.py, with config ``overrides``."""
    import transformers as tf

    if family in models.FAMILIES:
        cfg, name = models.config(family), type(models.build(family)).__name__
    else:
        cfg, name = models.newer_config(family, layers=4), models.NEWER_FAMILIES[family]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return getattr(tf, name)(cfg).float().eval()


# Heads that force the KV-copy path (fewer KV heads than ranks) and a count that cannot split.
KV_COPIES = {"qwen3_next": dict(num_key_value_heads=1), "olmo_hybrid": dict(num_key_value_heads=1)}  # of 4 heads
UNDIVIDED = ("qwen3_5", dict(linear_num_key_heads=1, linear_num_value_heads=3))


def _greedy(model) -> list[list[int]]:
    import graphdelta

    return graphdelta.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_id=[])


def save_checkpoint(root: str) -> None:
    """The checkpoint ``load_check`` reads by slices: tiny Qwen3-Next at hidden 512 (74 MB, large
    enough that the process's own memory overhead does not hide which half it reads)."""
    torch.manual_seed(0)
    models.build("qwen3_next", hidden=512).save_pretrained(os.path.join(root, "ckpt"))
    models.build("qwen3_next").save_pretrained(os.path.join(root, "warm-up"))


def references() -> dict:
    """Single-process logits and greedy tokens, and the cache bytes of one process."""
    from graphdelta.runtime import Runner

    x = models.tokens(9, batch=2)
    refs = {}
    cases = [(f, {}) for f in families()] + [(f, o) for f, o in KV_COPIES.items() if f in families()]
    for family, overrides in cases:
        model = build(family, **overrides)
        with torch.no_grad():
            logits = model(x).logits
        key = family + ("+copies" if overrides else "")
        refs[key] = dict(logits=logits, tokens=_greedy(model))
        if not overrides:
            cache = Runner(model, max_seqs=2, max_len=32).cache
            refs[key]["recurrent_bytes"] = cache.plan.recurrent_bytes_per_sequence
            refs[key]["attention_bytes"] = cache.plan.attention_bytes_per_token
    return refs


def load_check(root: str) -> dict:
    """Loading by slices, first thing in a fresh process: the growth of its peak memory."""
    import graphdelta
    from graphdelta.parallel.plan import local_bytes

    path = os.path.join(root, "ckpt")
    graphdelta.load(os.path.join(root, "warm-up"))  # transformers' modules imported, not measured
    model, growth = peak_memory_growth(lambda: graphdelta.load(path))
    x = models.tokens(9, batch=2)
    with torch.no_grad():
        sharded = model(x).logits
    files = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    out = dict(peak_growth=growth, checkpoint_bytes=files, bytes_read=model._graphdelta_bytes_read,
               local_bytes=local_bytes(model))
    del model
    torch.manual_seed(0)
    single = models.build("qwen3_next", hidden=512)
    with torch.no_grad():
        out["err"] = (sharded - single(x).logits).abs().max().item()
    return out


def dtensor_check(mesh) -> dict:
    """graphdelta's functional ops on DTensors (their ``register_sharding`` strategies): split by
    heads, by batch rows and by channels, against the same ops on whole tensors."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.ops.graphdelta
    gen = torch.Generator().manual_seed(0)
    B, T, H, HV, K, V = 2, 9, 2, 4, 16, 8
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v, s0 = torch.randn(B, T, HV, V, generator=gen), torch.randn(B, HV, K, V, generator=gen)
    gate, beta = -torch.rand(B, T, HV, generator=gen), torch.rand(B, T, HV, generator=gen)
    whole = g.chunk_gated_delta_rule(q, k, v, gate, beta, K ** -0.5, s0, None, True, "kv")
    out = {}
    for name, inputs, state in (("heads", Shard(2), Shard(1)), ("rows", Shard(0), Shard(0)),
                                ("replicated", Replicate(), Replicate())):
        d = [distribute_tensor(t, mesh, [inputs]) for t in (q, k, v, gate, beta)]
        o, final = g.chunk_gated_delta_rule(*d, K ** -0.5, distribute_tensor(s0, mesh, [state]), None, True, "kv")
        out[name] = dict(placements=[repr(o.placements[0]), repr(final.placements[0])],
                         err=max((o.full_tensor() - whole[0]).abs().max().item(),
                                 (final.full_tensor() - whole[1]).abs().max().item()))
    x, w, bias = torch.randn(B, T, 12, generator=gen), torch.randn(12, 4, generator=gen), torch.randn(12, generator=gen)
    y, state = g.causal_conv1d(x, w, bias, None, None, "silu")
    dy, dstate = g.causal_conv1d(distribute_tensor(x, mesh, [Shard(2)]), distribute_tensor(w, mesh, [Shard(0)]),
                                 distribute_tensor(bias, mesh, [Shard(0)]), None, None, "silu")
    out["conv"] = dict(placements=[repr(dy.placements[0])], err=max((dy.full_tensor() - y).abs().max().item(),
                                                                   (dstate.full_tensor() - state).abs().max().item()))
    z, wn = torch.randn(B, T, 12, generator=gen), torch.randn(12, generator=gen)
    n = g.gated_rms_norm(x, z, wn, 1e-6, "silu", True)
    dn = g.gated_rms_norm(distribute_tensor(x, mesh, [Shard(1)]), distribute_tensor(z, mesh, [Shard(1)]),
                          distribute_tensor(wn, mesh, [Replicate()]), 1e-6, "silu", True)
    out["norm"] = dict(placements=[repr(dn.placements[0])], err=(dn.full_tensor() - n).abs().max().item())
    return out


def checks(rank: int, refs: dict) -> dict:
    import graphdelta
    from graphdelta.parallel.plan import default_mesh
    from graphdelta.runtime import Runner

    out: dict = {}
    x = models.tokens(9, batch=2)
    mesh = default_mesh()

    for family in families():
        model = build(family)
        graphdelta.parallelize(model, mesh)
        with torch.no_grad():
            eager = (model(x).logits - refs[family]["logits"]).abs().max().item()
        runner = Runner(model, max_seqs=2, max_len=32)
        plan = runner.cache.plan
        record = dict(eager=eager, tokens=_greedy(model), nbytes=runner.cache.nbytes(),
                      planned=plan.total_bytes(2, 32), recurrent_bytes=plan.recurrent_bytes_per_sequence,
                      attention_bytes=plan.attention_bytes_per_token)
        sampled = graphdelta.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_id=[], temperature=1.0,
                                      seed=100 + rank)  # another seed per rank: rank 0's draws must win
        record["sampled"] = sampled
        if family in COMPILED:
            compiled = graphdelta.compile(model)
            with torch.no_grad():
                record["compiled"] = (compiled(x).logits - refs[family]["logits"]).abs().max().item()
            record["explain"] = graphdelta.explain(compiled)
            record["compiled_tokens"] = graphdelta.generate(compiled, PROMPTS, max_new_tokens=NEW_TOKENS,
                                                            eos_token_id=[], compile_steps=family == "qwen3_next")
        out[family] = record
    for family, overrides in KV_COPIES.items():
        if family in families():
            model = graphdelta.parallelize(build(family, **overrides), mesh)
            with torch.no_grad():
                err = (model(x).logits - refs[family + "+copies"]["logits"]).abs().max().item()
            out[family + "+copies"] = dict(eager=err, tokens=_greedy(model),
                                           kv_heads=model._graphdelta_tp.spec.attention.kv_heads)
    out["dtensor"] = dtensor_check(mesh)
    family, overrides = UNDIVIDED
    model = build(family, **overrides)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    try:
        graphdelta.parallelize(model, mesh)
        out["refusal"] = dict(error=None)
    except ValueError as err:
        out["refusal"] = dict(error=str(err), unchanged=shapes == {n: tuple(p.shape) for n, p in model.named_parameters()})
    return out


def run(rank: int, world: int, init: str, root: str) -> None:
    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        load = load_check(root)
        refs = references()
        result = checks(rank, refs)
        result["load"] = load
        result["references"] = {k: {n: v for n, v in r.items() if n != "logits"} for k, r in refs.items()}
    except BaseException:
        result = dict(error=traceback.format_exc())
    finally:
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()
