"""Build, train and save the tiny Qwen3-Next checkpoint that ships in graphdelta/assets/.

The model is a 4-layer hybrid (3 Gated DeltaNet layers : 1 gated full-attention layer) with a
small mixture of experts, a byte-level vocabulary and tied embeddings. It is trained on CPU for a
bounded wall time on the Python standard-library sources of the running interpreter (Python
Software Foundation License), so that greedy generation from "def " looks like Python.

    python examples/make_checkpoint.py                 # reproduces the shipped checkpoint
    python examples/make_checkpoint.py --minutes 1 --out /tmp/tiny

The learning-rate schedule runs on whichever ends first, the step budget or the wall-time budget,
so a slower machine still finishes its cosine decay; the exact weights therefore depend on the
machine's speed, everything else (data, order of batches, initialisation) is seeded.
"""
from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3NextConfig, Qwen3NextForCausalLM

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "graphdelta" / "assets" / "qwen3next-tiny"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_ID = 256  # first id after the 256 byte ids
PAD_ID = 259


@dataclass
class ModelArgs:
    hidden_size: int = 256
    num_layers: int = 4
    full_attention_every: int = 4  # layer i is full attention when (i + 1) % this == 0
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4  # GVA ratio 2
    linear_head_dim: int = 64
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    shared_expert_intermediate_size: int = 128
    max_position_embeddings: int = 2048


@dataclass
class TrainArgs:
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    max_steps: int = 1000
    minutes: float = 20.0  # a cap: 1000 steps take ~8 minutes on an idle core (0.45 s/step)
    threads: int = 1
    seed: int = 0
    val_every_nth_file: int = 25
    log_every: int = 25


# ---------------------------------------------------------------------------------------------
# Tokenizer: one token per byte (ids 0..255 are the byte values), then the special tokens.
# ---------------------------------------------------------------------------------------------

def byte_to_char() -> dict[int, str]:
    """The printable-character stand-in for each byte that the ByteLevel pre-tokenizer uses:
    printable Latin-1 bytes stand for themselves, the others are shifted past U+0100 in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {char: byte for byte, char in byte_to_char().items()}
    assert sorted(vocab.keys()) == sorted(pre_tokenizers.ByteLevel.alphabet()), "byte alphabet mismatch"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=ModelArgs.max_position_embeddings,
    )
    assert fast.convert_tokens_to_ids(SPECIAL_TOKENS) == [256, 257, 258, 259], "special ids moved"
    return fast


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def model_config(args: ModelArgs) -> Qwen3NextConfig:
    layer_types = [
        "full_attention" if (i + 1) % args.full_attention_every == 0 else "linear_attention"
        for i in range(args.num_layers)
    ]
    return Qwen3NextConfig(
        vocab_size=256 + len(SPECIAL_TOKENS),
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.moe_intermediate_size,  # unused: every layer is sparse
        num_hidden_layers=args.num_layers,
        layer_types=layer_types,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        linear_num_key_heads=args.linear_num_key_heads,
        linear_num_value_heads=args.linear_num_value_heads,
        linear_key_head_dim=args.linear_head_dim,
        linear_value_head_dim=args.linear_head_dim,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        moe_intermediate_size=args.moe_intermediate_size,
        shared_expert_intermediate_size=args.shared_expert_intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


# ---------------------------------------------------------------------------------------------
# Data: the top-level .py files of this interpreter's standard library, sorted by name.
# ---------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    train: torch.Tensor  # [N] int64 byte ids, files joined by <|endoftext|>
    val: torch.Tensor
    description: str


def load_corpus(every_nth_val: int) -> Corpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files under the stdlib path {stdlib}")
    train_ids: list[int] = []
    val_ids: list[int] = []
    n_train = n_val = 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if i % every_nth_val == every_nth_val - 1:
            val_ids += [*data, EOS_ID]
            n_val += 1
        else:
            train_ids += [*data, EOS_ID]
            n_train += 1
    version = ".".join(map(str, sys.version_info[:3]))
    description = (
        f"the {n_train + n_val} top-level `*.py` files of the CPython {version} standard library "
        f"(`{stdlib.name}/*.py`, sorted by name; every {every_nth_val}th file held out for "
        f"validation: {n_train} train files / {len(train_ids):,} bytes, {n_val} validation files / "
        f"{len(val_ids):,} bytes), one token per byte, files separated by <|endoftext|>"
    )
    return Corpus(torch.tensor(train_ids), torch.tensor(val_ids), description)


def sample_batch(data: torch.Tensor, args: TrainArgs, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=gen)
    return torch.stack([data[s : s + args.seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: Qwen3NextForCausalLM, data: torch.Tensor, args: TrainArgs, batches: int = 8) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = [model(input_ids=(x := sample_batch(data, args, gen)), labels=x).loss.item() for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    final_train_loss: float  # mean over the last log_every steps
    val_loss: float


def learning_rate(args: TrainArgs, step: int, progress: float) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(model: Qwen3NextForCausalLM, corpus: Corpus, args: TrainArgs) -> TrainResult:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    budget_s = args.minutes * 60
    start = time.perf_counter()
    recent: deque[float] = deque(maxlen=args.log_every)
    step = 0
    model.train()
    while step < args.max_steps:
        elapsed = time.perf_counter() - start
        progress = max(step / args.max_steps, elapsed / budget_s)
        if progress >= 1.0:
            break
        lr = learning_rate(args, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        x = sample_batch(corpus.train, args, gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        recent.append(loss.item())
        if step % args.log_every == 0:
            tok_s = step * args.batch_size * args.seq_len / (time.perf_counter() - start)
            print(f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  lr {lr:.2e}  "
                  f"{tok_s:,.0f} tok/s  {time.perf_counter() - start:6.1f}s", flush=True)
    wall_s = time.perf_counter() - start
    return TrainResult(
        steps=step,
        tokens=step * args.batch_size * (args.seq_len + 1),
        wall_s=wall_s,
        final_train_loss=sum(recent) / len(recent),
        val_loss=evaluate(model, corpus.val, args),
    )


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

SAMPLE_PROMPTS = ["def ", "import os\n"]


@torch.no_grad()
def greedy_samples(model: Qwen3NextForCausalLM, tokenizer: PreTrainedTokenizerFast, new_tokens: int = 120) -> dict[str, str]:
    model.eval()
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        again = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        if not torch.equal(out, again):
            raise RuntimeError(f"greedy generation is not deterministic for prompt {prompt!r}")
        samples[prompt] = tokenizer.decode(out[0], skip_special_tokens=False)
    return samples


def write_readme(out: Path, margs: ModelArgs, targs: TrainArgs, corpus: Corpus, result: TrainResult,
                 n_params: int, samples: dict[str, str]) -> None:
    stop_note = (
        f"; stopped by the {targs.minutes:g}-minute cap before the {targs.max_steps}-step budget "
        f"(the cosine decay follows whichever is nearer its end, so it still finished)"
        if result.steps < targs.max_steps else ""
    )
    sample_text = "\n".join(f"Prompt {p!r}:\n\n```\n{s}\n```\n" for p, s in samples.items())
    text = f"""# qwen3next-tiny

A tiny `Qwen3NextForCausalLM` that graphdelta's demo and tests use as their default model.
It is made by `examples/make_checkpoint.py` (run with its defaults) and loads offline with
`graphdelta.assets.load_default_model()` or `AutoModelForCausalLM.from_pretrained` /
`AutoTokenizer.from_pretrained` on this folder.

## Model

- {n_params:,} parameters (fp32), {margs.num_layers} layers: {", ".join(model_config(margs).layer_types)}
- hidden {margs.hidden_size}; Gated DeltaNet: {margs.linear_num_key_heads} key heads, {margs.linear_num_value_heads} value heads (GVA ratio {margs.linear_num_value_heads // margs.linear_num_key_heads}), head dim {margs.linear_head_dim}
- gated full attention: {margs.num_attention_heads} query heads, {margs.num_key_value_heads} KV heads, head dim {margs.head_dim}
- sparse MoE in every layer: {margs.num_experts} experts, top-{margs.num_experts_per_tok}, expert width {margs.moe_intermediate_size}, shared expert width {margs.shared_expert_intermediate_size}
- byte-level vocabulary: ids 0-255 are the bytes, then {", ".join(SPECIAL_TOKENS)} (ids 256-259); tied embeddings

## Training

- data: {corpus.description}
- {result.steps} steps of AdamW (lr {targs.lr} with {targs.warmup_steps} warmup steps and a cosine decay to {targs.min_lr}), batch {targs.batch_size} x {targs.seq_len} tokens, {result.tokens:,} tokens seen
- {result.wall_s / 60:.1f} minutes wall on CPU with {targs.threads} thread(s), torch {torch.__version__}{stop_note}
- final training loss {result.final_train_loss:.4f} nats/byte (mean of the last {targs.log_every} steps), validation loss {result.val_loss:.4f} nats/byte

## Greedy samples

{sample_text}
## License

The training text is the source of the Python standard library, distributed under the Python
Software Foundation License (PSF License Agreement, https://docs.python.org/3/license.html).
The weights are a small derived work trained on it and ship with graphdelta under its license
(Apache-2.0), with this notice.
"""
    (out / "README.md").write_text(text)


def parse_args() -> tuple[ModelArgs, TrainArgs, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    for args_cls in (ModelArgs, TrainArgs):
        for name, value in asdict(args_cls()).items():
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    ns = vars(parser.parse_args())
    margs = ModelArgs(**{k: ns[k] for k in asdict(ModelArgs())})
    targs = TrainArgs(**{k: ns[k] for k in asdict(TrainArgs())})
    return margs, targs, ns["out"]


def main() -> None:
    margs, targs, out = parse_args()
    torch.set_num_threads(targs.threads)
    torch.manual_seed(targs.seed)

    tokenizer = build_tokenizer()
    corpus = load_corpus(targs.val_every_nth_file)
    print(f"data: {corpus.description}")
    first_file = bytes(corpus.train[: corpus.train.tolist().index(EOS_ID)].tolist()).decode()[:1000]
    if tokenizer(first_file).input_ids != list(first_file.encode()):
        raise RuntimeError("the tokenizer does not map text to its utf-8 bytes")

    model = Qwen3NextForCausalLM(model_config(margs))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, layer types {model.config.layer_types}")

    result = train(model, corpus, targs)
    print(f"trained {result.steps} steps in {result.wall_s:.0f}s: train loss {result.final_train_loss:.4f}, "
          f"val loss {result.val_loss:.4f}")

    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_new_tokens=128,
    )
    samples = greedy_samples(model, tokenizer)
    for prompt, text in samples.items():
        print(f"--- greedy from {prompt!r} ---\n{text}")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_readme(out, margs, targs, corpus, result, n_params, samples)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print(f"saved to {out}: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
