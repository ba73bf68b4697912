"""Tensor parallelism (``graphdelta.parallelize``, ``graphdelta.load``) in 2 processes on CPU
(gloo, one thread each): every family's sharded logits against one process's, sharded
``graphdelta.compile`` (one GDN and one KDA family), ``graphdelta.generate`` greedy and
sampled, per-rank cache bytes, loading by slices, KV heads copied when there are fewer than
ranks, refusals. The processes run once (tests/parallel_worker.py) and the tests read what
they recorded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import parallel_worker as worker

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
TOL = 1e-5  # fp32: the row-parallel sums add the same terms in another order


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root = str(tmp_path_factory.mktemp("tp"))
    worker.save_checkpoint(root)
    init = "file://" + os.path.join(tempfile.mkdtemp(), "rendezvous")
    mp.spawn(worker.run, args=(WORLD, init, root), nprocs=WORLD, join=True)
    results = []
    for r in range(WORLD):
        with open(os.path.join(root, f"rank{r}.json")) as f:
            results.append(json.load(f))
        assert "error" not in results[-1], results[-1].get("error")
    return results


@pytest.mark.parametrize("family", worker.ALL)
def test_sharded_eager_matches_one_process(ranks, family):
    if family not in worker.families():
        pytest.skip(f"{family} needs a newer transformers")
    for r in ranks:
        assert r[family]["eager"] < TOL


@pytest.mark.parametrize("family", worker.COMPILED)
def test_sharded_compile_matches_one_process(ranks, family):
    for rank, r in enumerate(ranks):
        record = r[family]
        assert record["compiled"] < TOL
        text = record["explain"]
        assert f"tensor parallel: rank {rank} of {WORLD}" in text
        assert "replaced" in text and "collectives: all_reduce" in text
        assert record["compiled_tokens"] == r["references"][family]["tokens"]


@pytest.mark.parametrize("family", worker.ALL)
def test_generate_same_tokens_on_every_rank(ranks, family):
    if family not in worker.families():
        pytest.skip(f"{family} needs a newer transformers")
    expected = ranks[0]["references"][family]["tokens"]
    for r in ranks:
        assert r[family]["tokens"] == expected  # greedy: as one process
        assert r[family]["sampled"] == ranks[0][family]["sampled"]  # sampled with other seeds: rank 0's draws


@pytest.mark.parametrize("family", worker.ALL)
def test_cache_holds_this_ranks_heads(ranks, family):
    if family not in worker.families():
        pytest.skip(f"{family} needs a newer transformers")
    single = ranks[0]["references"][family]
    for r in ranks:
        record = r[family]
        assert record["nbytes"] == record["planned"]
        assert record["recurrent_bytes"] * WORLD == single["recurrent_bytes"]
        # attention: KV heads split (Qwen, OLMo: 2 KV heads); MLA's one latent is replicated
        mla = family in ("kimi_linear", "bailing_hybrid")
        assert record["attention_bytes"] * (1 if mla else WORLD) == single["attention_bytes"]


@pytest.mark.parametrize("family", sorted(worker.KV_COPIES))
def test_fewer_kv_heads_than_ranks_are_copied(ranks, family):
    if family not in worker.families():
        pytest.skip(f"{family} needs a newer transformers")
    for r in ranks:
        record = r[family + "+copies"]
        assert record["eager"] < TOL and record["kv_heads"] == 1
        assert record["tokens"] == r["references"][family + "+copies"]["tokens"]


def test_load_reads_only_this_ranks_slices(ranks):
    for r in ranks:
        load = r["load"]
        assert load["err"] < TOL
        assert load["bytes_read"] == load["local_bytes"] < 0.7 * load["checkpoint_bytes"]
        if load["peak_growth"] is not None:  # the growth of the process's peak memory: its half, not the file
            assert load["peak_growth"] < 0.75 * load["checkpoint_bytes"]  # loading whole: >= 1x


def test_indivisible_heads_refused_before_any_change(ranks):
    for r in ranks:
        refusal = r["refusal"]
        assert refusal["error"] is not None and "linear_num_key_heads=1" in refusal["error"]
        assert "2 ranks" in refusal["error"] and refusal["unchanged"]


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_cli_under_torchrun_prints_one_processs_text():
    """``torchrun -m graphdelta generate`` (graphdelta's runtime without compile, to stay quick):
    rank 0 prints the text one process prints."""
    args = ["-m", "graphdelta", "generate", "--no-compile", "--max-new-tokens", "12"]
    single = _run(sys.executable, *args).stdout
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    both = _run(*torchrun, *args)
    assert both.stdout == single and single.strip()
    assert "tensor parallel over 2 ranks" in both.stderr


def test_example_generates_on_two_processes():
    out = _run(sys.executable, "examples/generate_tp.py", "--no-compile", "--max-new-tokens", "12").stdout
    assert "rank 0 of 2: 2 GDN value heads" in out and "rank 1 of 2" in out
    assert "12 tokens in" in out


def test_ops_on_dtensors_keep_their_split(ranks):
    """``register_sharding``: the ops run on each rank's part and return the same split."""
    expected = {"heads": ["Shard(dim=2)", "Shard(dim=1)"], "rows": ["Shard(dim=0)", "Shard(dim=0)"],
                "replicated": ["Replicate()", "Replicate()"], "conv": ["Shard(dim=2)"], "norm": ["Shard(dim=1)"]}
    for r in ranks:
        for name, placements in expected.items():
            assert r["dtensor"][name]["placements"] == placements, name
            assert r["dtensor"][name]["err"] < 1e-6, name


@pytest.mark.parametrize("family", ["kimi_linear", "bailing_hybrid"])
def test_load_keeps_what_transformers_keeps_in_float32(tmp_path, family):
    """``graphdelta.load`` in bf16 gives ``from_pretrained``'s dtypes (routers, dt_bias, A_log
    kept in float32) and logits (one process, no sharding)."""
    import graphdelta
    import models
    import transformers as tf

    if family not in models.FAMILIES and not models.newer_available(family):
        pytest.skip(f"{family} needs a newer transformers")
    model = models.build(family) if family in models.FAMILIES else models.build_newer(family, layers=4)
    model.save_pretrained(tmp_path)
    ours = graphdelta.load(tmp_path, dtype=torch.bfloat16)
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in theirs.named_parameters()}
    assert {n: p.dtype for n, p in ours.named_parameters()} == dtypes
    keeps = [getattr(type(theirs), f"_keep_in_fp32_modules{s}", None) for s in ("", "_strict")]
    if any(keeps):  # (transformers 5.17's Kimi Linear keeps none: both stay all bf16)
        assert torch.float32 in dtypes.values()
    x = models.tokens(9)
    with torch.no_grad():
        assert torch.equal(ours(x).logits, theirs(x).logits)


def test_load_refuses_weights_that_do_not_match_the_config(tmp_path):
    """A config whose sizes differ from its weights is refused by name, not read at the wrong
    offsets."""
    import graphdelta
    import models

    models.build("qwen3_next").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["linear_num_value_heads"] = 2 * config["linear_num_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the model expects"):
        graphdelta.load(tmp_path)


def test_a_failure_while_sharding_leaves_the_model_as_it_was(monkeypatch):
    """A style that fails part-way (here: the tenth, as out of memory would) leaves every
    module as it was: same parameters, no all-reduce hooks, not marked parallel; a later
    ``parallelize`` can run. One process: a mesh of one rank (gloo)."""
    import graphdelta
    import models
    from graphdelta.parallel import styles
    from torch.distributed.device_mesh import init_device_mesh

    if torch.distributed.is_initialized():
        pytest.skip("a process group is already up")
    init = "file://" + os.path.join(tempfile.mkdtemp(), "rendezvous")
    torch.distributed.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = models.build("qwen3_next")
        before = {n: p for n, p in model.named_parameters()}
        x = models.tokens(5)
        with torch.no_grad():
            reference = model(x).logits
        calls = []
        real = styles.Split._apply

        def failing(self, module, device_mesh):
            calls.append(module)
            if len(calls) == 10:
                raise MemoryError("out of memory (injected)")
            return real(self, module, device_mesh)

        monkeypatch.setattr(styles.Split, "_apply", failing)
        with pytest.raises(MemoryError):
            graphdelta.parallelize(model, mesh)
        assert len(calls) == 10
        assert {n: p for n, p in model.named_parameters()} == before
        assert not any(m._forward_hooks for m in model.modules()) and not hasattr(model, "_graphdelta_tp")
        monkeypatch.undo()
        with torch.no_grad():
            assert torch.equal(model(x).logits, reference)
        graphdelta.parallelize(model, mesh)  # one rank: the same model, now marked parallel
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, reference, atol=TOL, rtol=0)
    finally:
        torch.distributed.destroy_process_group()
