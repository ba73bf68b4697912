"""llama.cpp as an anchor on CPU: prefill and batch-1 decode of the same checkpoint in
llama.cpp (llama-cpp-python), transformers eager, optionally ``torch.compile``, and graphdelta,
taking turns, at the same thread count and weight type: float32 (default) or ``--dtype
bfloat16`` (llama.cpp's bf16 GGUF; on CPUs with AVX512-BF16 / AMX). A bf16 run also checks
bf16 against float32: graphdelta's top-1 agreement and largest logit error over a prompt.

It builds nothing. llama-cpp-python must be installed (``pip install -e ".[llamacpp]"``: a
source build, 15+ minutes on 2 cores, so never in CI). The checkpoint goes to GGUF (f32) by
llama.cpp's own converter, ``convert_hf_to_gguf.py`` with its vendored ``gguf-py``, taken from
``--llama-cpp`` (a llama.cpp checkout or a llama-cpp-python sdist) or else from the sdist of the
installed llama-cpp-python, fetched with pip into the cache folder. Two things are adjusted in
the converter for the shipped byte-level tokenizer (256 bytes + specials, no merges), neither
of which touches a weight: its pre-tokenizer is unknown to llama.cpp (named "default") and
llama.cpp's BPE loader wants one merge (a placeholder is added). llama.cpp never tokenizes text
here: every system gets the same token ids.

Before any timing, the greedy tokens of every system are compared (``--check-tokens`` of them)
and llama.cpp's last-position logits against transformers'. Then, over ``--rounds`` rounds
(each system in turn, the first round dropped), medians of:
- prefill: one forward over ``--lengths`` tokens from an empty state (llama.cpp: ``eval`` of the
  prompt; transformers and graphdelta: the model's forward, all positions' logits);
- decode: end to end, batch 1, greedy, per token after the first, ``--new-tokens`` tokens
  (llama.cpp: ``eval`` of one token and an argmax of its logits; transformers:
  ``generate``; graphdelta: ``graphdelta.generate`` with compiled steps, timed by its stream).

Configs: ``embedded`` (the shipped trained tiny Qwen3-Next), ``mid`` (hidden 1024, 8 layers,
random weights, the shipped tokenizer's vocabulary: 144M parameters).

    python benchmarks/llamacpp.py --config embedded
    python benchmarks/llamacpp.py --config mid --rounds 5
    python benchmarks/llamacpp.py --config embedded --dtype bfloat16
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import results_dir, write_results  # noqa: E402

CONFIGS = {"embedded": None, "mid": dict(hidden_size=1024, layers=8)}


# ----------------------------------------------------------------------------- the checkpoint


def checkpoint(config: str, folder: Path) -> Path:
    """The checkpoint folder of ``config``: the shipped one, or a random mid-size Qwen3-Next
    with the shipped tokenizer (so llama.cpp's converter finds a vocabulary)."""
    from graphdelta.assets import DEFAULT_MODEL_DIR

    if config == "embedded":
        return DEFAULT_MODEL_DIR
    import models
    import transformers as tf

    path = folder / f"qwen3next-{config}"
    if not (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists():
        base = tf.AutoConfig.from_pretrained(DEFAULT_MODEL_DIR)
        cfg = models.config("qwen3_next", hidden=CONFIGS[config]["hidden_size"], layers=CONFIGS[config]["layers"])
        cfg.vocab_size = base.vocab_size
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(cfg, key, getattr(base, key, None))
        torch.manual_seed(0)
        tf.Qwen3NextForCausalLM(cfg).eval().save_pretrained(path)
        for f in DEFAULT_MODEL_DIR.iterdir():
            if f.name.startswith("tokenizer") or f.name == "generation_config.json":
                shutil.copy(f, path / f.name)
    return path


def converter_source(given: Path | None, cache: Path) -> Path:
    """A folder holding llama.cpp's ``convert_hf_to_gguf.py`` and ``gguf-py``."""
    if given is not None and given.is_dir():
        return given
    if given is None:  # the sdist of the installed llama-cpp-python: the converter that matches it
        from importlib.metadata import version

        wanted = version("llama-cpp-python")
        given = cache / f"llama_cpp_python-{wanted}.tar.gz"
        if not given.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={wanted}", "-d", str(cache)], check=True)
    out = cache / given.name.removesuffix(".tar.gz")
    if not out.exists():
        with tarfile.open(given) as tar:
            tar.extractall(cache, filter="data")
    found = next(out.rglob("convert_hf_to_gguf.py"), None)
    if found is None:
        raise SystemExit(f"--llama-cpp: no convert_hf_to_gguf.py in {given}")
    return found.parent


CONVERT = r'''
import sys, runpy
source, model, out = sys.argv[1:4]
sys.path[:0] = [source, source + "/gguf-py"]
import gguf
from conversion.base import TextModel

known = TextModel.get_vocab_base_pre
def pre_tokenizer(self, tokenizer):  # unknown to llama.cpp; never used: it gets token ids
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "default"
TextModel.get_vocab_base_pre = pre_tokenizer

add = gguf.SpecialVocab.add_to_gguf
def with_a_merge(self, writer, *args, **kwargs):  # llama.cpp's BPE loader wants >= 1 merge
    if getattr(self, "load_merges", False) and not self.merges:
        self.merges = ["\u0120 \u0120"]
    return add(self, writer, *args, **kwargs)
gguf.SpecialVocab.add_to_gguf = with_a_merge

sys.argv = [source + "/convert_hf_to_gguf.py", model, "--outtype", sys.argv[4], "--no-mtp", "--outfile", out]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def to_gguf(model_dir: Path, source: Path, out: Path, outtype: str) -> Path:
    if not out.exists():
        subprocess.run([sys.executable, "-c", CONVERT, str(source), str(model_dir), str(out), outtype], check=True)
    return out


# ----------------------------------------------------------------------------- the systems


class LlamaCpp:
    """llama.cpp on a GGUF: greedy decoding by an argmax of the last logits."""

    def __init__(self, path: Path, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                         n_batch=context, verbose=False)
        self.vocab = self.llm.n_vocab()

    def last_logits(self):
        import numpy as np

        # llama-cpp-python keeps no logits without logits_all: read the context's last row
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return int(self.last_logits().argmax())

    def generate(self, ids: list[int], n: int, stamps: list[float] | None = None) -> list[int]:
        token, out = self.prefill(ids), []
        for _ in range(n):
            out.append(token)
            if stamps is not None:
                stamps.append(time.perf_counter())
            if len(out) == n:
                break
            self.llm.eval([token])
            token = int(self.last_logits().argmax())
        return out


def transformers_generate(model, ids: list[int], n: int, stamps: list[float] | None = None) -> list[int]:
    """transformers' greedy generate, stamped per token by a streamer."""
    from transformers.generation.streamers import BaseStreamer

    class Stamp(BaseStreamer):
        first = True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
            elif stamps is not None:
                stamps.append(time.perf_counter())

        def end(self):
            pass

    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         streamer=Stamp())
    return out[0, len(ids):].tolist()


def graphdelta_generate(compiled, ids: list[int], n: int, stamps: list[float] | None = None) -> list[int]:
    import graphdelta

    stream = (lambda i, t: stamps.append(time.perf_counter())) if stamps is not None else None
    return graphdelta.generate(compiled, [ids], max_new_tokens=n, eos_token_id=[], compile_steps=True,
                               max_batch=1, stream=stream)[0]


def bf16_accuracy(compiled, model_dir: Path, length: int, vocab: int) -> dict:
    """graphdelta in bf16 against graphdelta in float32 on ``length`` tokens of Python source
    (the shipped model's training domain): the share of positions whose most likely token is
    the same, and the largest logit error relative to the largest float32 logit."""
    import inspect
    import json

    import graphdelta
    from graphdelta.assets import OFFLINE, load_checkpoint
    from transformers import AutoTokenizer

    text = inspect.getsource(json.decoder) * 4
    ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir, **OFFLINE)(text).input_ids[:length]]) % vocab
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = graphdelta.compile(load_checkpoint(model_dir, torch.float32))(ids, use_cache=False).logits
    got = compiled(ids, use_cache=False).logits.float()
    return {"bf16_top1_vs_f32": (got.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "bf16_rel_err_vs_f32": ((got - reference).abs().max() / reference.abs().max()).item()}


def per_token(fn, ids: list[int], n: int) -> float:
    """Seconds per token after the first (end to end: the loop, the step, the argmax)."""
    stamps: list[float] = []
    fn(ids, n, stamps)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


# ----------------------------------------------------------------------------- the run


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="embedded", choices=sorted(CONFIGS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--new-tokens", type=int, default=64, help="decode tokens per round")
    parser.add_argument("--check-tokens", type=int, default=64, help="greedy tokens compared before timing")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights of every system (llama.cpp: an f32 or bf16 GGUF)")
    parser.add_argument("--min-agree", type=int, default=None,
                        help="greedy tokens that must equal eager's before timing (default: all of "
                             "--check-tokens in float32, 16 in bfloat16, whose rounding may part later)")
    parser.add_argument("--modes", default="llama_cpp,eager,graphdelta",
                        help="add torch_compile to include it (a compile per prompt length)")
    parser.add_argument("--llama-cpp", type=Path, default=None,
                        help="llama.cpp checkout or llama-cpp-python sdist holding convert_hf_to_gguf.py "
                             "(default: the installed version's sdist, fetched with pip)")
    args = parser.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401 (installed?)
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install -e \".[llamacpp]\" "
                         "(it builds llama.cpp from source: 15+ minutes on 2 cores)") from None
    import graphdelta
    import models
    from graphdelta.assets import load_checkpoint

    torch.set_num_threads(args.threads)
    names = [m for m in ("llama_cpp", "eager", "torch_compile", "graphdelta") if m in args.modes.split(",")]
    if not {"llama_cpp", "eager", "graphdelta"} <= set(names):
        raise SystemExit(f"--modes must include llama_cpp, eager and graphdelta (the checks compare them), got {args.modes}")
    decoders = [n for n in names if n != "torch_compile"]
    cache = results_dir() / "llamacpp"
    cache.mkdir(parents=True, exist_ok=True)
    model_dir = checkpoint(args.config, cache)
    outtype = "f32" if args.dtype == "float32" else "bf16"
    gguf_path = to_gguf(model_dir, converter_source(args.llama_cpp, cache),
                        cache / f"qwen3next-{args.config}-{outtype}.gguf", outtype)
    dtype = getattr(torch, args.dtype)
    model = load_checkpoint(model_dir, dtype)
    vocab = model.config.vocab_size
    context = max(args.lengths) + args.new_tokens + args.check_tokens + 8
    llama = LlamaCpp(gguf_path, args.threads, context)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = graphdelta.compile(model)
    forwards = {"llama_cpp": llama.prefill, "eager": lambda ids: model(torch.tensor([ids]), use_cache=False),
                "graphdelta": lambda ids: compiled(torch.tensor([ids]), use_cache=False)}
    generators = {"llama_cpp": llama.generate, "eager": lambda ids, n, s=None: transformers_generate(model, ids, n, s),
                  "graphdelta": lambda ids, n, s=None: graphdelta_generate(compiled, ids, n, s)}
    if "torch_compile" in names:  # prefill only: transformers' generate would call the uncompiled forward
        tc = torch.compile(model)
        forwards["torch_compile"] = lambda ids: tc(torch.tensor([ids]), use_cache=False)

    # agreement first: greedy tokens from a short prompt, and llama.cpp's logits
    prompt = models.tokens(16, vocab=vocab, seed=5)[0].tolist()
    greedy = {name: generators[name](prompt, args.check_tokens) for name in decoders}
    agree = {name: sum(a == b for a, b in zip(greedy[name], greedy["eager"])) for name in decoders}
    llama.prefill(prompt)
    reference = model(torch.tensor([prompt])).logits[0, -1].float()
    logit_error = (torch.from_numpy(llama.last_logits().copy()) - reference).abs().max().item()
    print(f"greedy tokens equal to eager's (of {args.check_tokens}): {agree}; llama.cpp last logits max abs "
          f"error {logit_error:.2e}", flush=True)
    need = args.min_agree if args.min_agree is not None else (args.check_tokens if args.dtype == "float32" else 16)
    first_difference = {n: next((i for i, (a, b) in enumerate(zip(greedy[n], greedy["eager"])) if a != b),
                                args.check_tokens) for n in decoders}
    if any(d < need for d in first_difference.values()):
        raise SystemExit(f"greedy tokens part before token {need} ({first_difference}): not timing them")
    accuracy = bf16_accuracy(compiled, model_dir, args.lengths[0], vocab) if args.dtype == "bfloat16" else {}
    if accuracy:
        print(f"bf16 against float32 (graphdelta, {args.lengths[0]} positions): {accuracy}", flush=True)

    rows = []
    for length in args.lengths:
        ids = models.tokens(length, vocab=vocab, seed=1)[0].tolist()
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds + 1):  # the first round compiles what this length needs, and is dropped
            for name in names:
                start = time.perf_counter()
                forwards[name](ids)
                times[name].append(time.perf_counter() - start)
        row = {"measure": f"prefill {length} tokens (s)", **{n: statistics.median(t[1:]) for n, t in times.items()}}
        rows.append(row)
        print(row, flush=True)
    steps: dict[str, list[float]] = {n: [] for n in decoders}
    for _ in range(args.rounds + 1):
        for name in decoders:
            steps[name].append(per_token(generators[name], prompt, args.new_tokens))
    row = {"measure": "decode batch 1, end to end (tokens/s)",
           **{n: (1 / statistics.median(steps[n][1:]) if n in steps else None) for n in names}}
    rows.append(row)
    print(row, flush=True)
    for row in rows:  # graphdelta against each other system: > 1 means graphdelta is faster
        decode = row["measure"].startswith("decode")
        for name in names[:-1]:
            if row[name] is not None:
                row[f"graphdelta_vs_{name}"] = (row["graphdelta"] / row[name]) if decode else (row[name] / row["graphdelta"])

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.5))
        for ax, row in zip(axes, rows):
            ax.bar(names, [row[n] or 0.0 for n in names])
            ax.set_title(row["measure"], fontsize=9)
            ax.tick_params(labelsize=7)
        fig.suptitle(f"qwen3_next {args.config}, CPU {args.dtype}, {args.threads} threads, taking turns", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)

    command = "python benchmarks/llamacpp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    columns = ["measure", *names, *[c for c in rows[0] if c.startswith("graphdelta_vs_")]]
    for row in rows:
        for column in columns:
            row.setdefault(column, None)  # (torch_compile: no decode figure)
        row["greedy_agree"] = f"{min(agree.values())}/{args.check_tokens}"
        row["llama_logit_err"] = logit_error
        row.update(accuracy)
    suffix = "" if args.dtype == "float32" else "_bf16"
    print(write_results(f"llamacpp_{args.config}{suffix}", rows,
                        columns + ["greedy_agree", "llama_logit_err", *accuracy], command.strip(), plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
