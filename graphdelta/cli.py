"""The ``graphdelta`` command: generate, explain, bench, fuzz.

    graphdelta generate --prompt "def " --max-new-tokens 64     # the embedded model, streamed
    torchrun --nproc-per-node 2 -m graphdelta generate ...      # tensor parallel over 2 ranks
    graphdelta explain [MODEL_DIR]                              # what compile fused, per layer
    graphdelta bench ops|kernels|compile|prefill|decode|all|tp|llamacpp   # benchmark scripts (from a clone)
    graphdelta fuzz --impl chunk --examples 200                 # kernels against the reference
"""
from __future__ import annotations

import argparse
import os
import re
import runpy
import sys
import time
from pathlib import Path

BENCHMARKS = ("ops_cpu", "kernels", "compile", "prefill", "decode")  # what `bench all` runs
SEPARATE_BENCHMARKS = ("tp", "llamacpp")  # only by name: 2 processes; llama-cpp-python installed


def version() -> str:
    """graphdelta's version and those of the libraries it runs on (read without importing them)."""
    from importlib import metadata

    def of(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "graphdelta":  # a checkout on sys.path, not installed
                from graphdelta import __version__

                return f"{__version__} (not installed)"
            return "not installed"

    libs = ", ".join(f"{name} {of(name)}" for name in ("torch", "triton", "transformers"))
    return f"graphdelta {of('graphdelta')} (Python {sys.version.split()[0]}, {libs})"


def _device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible here; leave --device at cpu")
    return name


def check_generate_args(args: argparse.Namespace) -> None:
    """Everything ``generate`` can refuse, refused before a model is loaded or compiled."""
    from graphdelta.runtime.generate import check_sampling

    if args.max_new_tokens < 0:
        raise SystemExit(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.prompt:
        raise SystemExit("--prompt is empty: give some text to continue")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        raise SystemExit(f"--{str(err).replace('_', '-')}") from None
    if args.model is not None and not args.model.is_dir():
        raise SystemExit(f"--model: {args.model} does not exist: give a local transformers checkpoint folder")


def cmd_generate(args: argparse.Namespace) -> int:
    check_generate_args(args)
    import torch

    from graphdelta import progress
    from graphdelta.assets import CheckpointError, load_model

    device = _device(args.device)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    lead = int(os.environ.get("RANK", "0")) == 0  # under torchrun, only the first rank prints
    progress.show(lead)
    if ranks > 1:  # each rank reads its slices: a missing weight or a config that does not match is refused
        try:
            model, tokenizer = load_parallel(args.model, getattr(torch, args.dtype), device)
        except (FileNotFoundError, CheckpointError, KeyError, ValueError, NotImplementedError) as err:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            raise SystemExit(f"--model: {err}")
    else:
        try:  # a checkpoint with missing or unexpected weights is refused, not run with random ones
            model, tokenizer = load_model(args.model, getattr(torch, args.dtype), device, strict=True)
        except (FileNotFoundError, CheckpointError) as err:
            raise SystemExit(f"--model: {err}")
    try:
        new, ids, start, stamps = _generate(args, model, tokenizer, device, lead)
    finally:
        if ranks > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    # The ranks tear the group down together (barrier), and rank 0, which holds torchrun's
    # store, prints after it: a rank whose peer or store goes away while it still tears its
    # group down aborts at exit (seen 1 run in 8-10 without these; 0 in 18 with both).
    if stamps:
        decode = f", then {(len(stamps) - 1) / (stamps[-1] - stamps[0]):.1f} tokens/s" if len(stamps) > 1 else ""
        print(f"{len(new)} tokens: first after {(stamps[0] - start) * 1e3:.0f} ms (prefill of {len(ids)}){decode} "
              f"(batch 1, {torch.get_num_threads()} threads, {args.dtype} on {device}"
              f"{f', tensor parallel over {ranks} ranks' if ranks > 1 else ''})", file=sys.stderr)
    return 0


def _generate(args: argparse.Namespace, model, tokenizer, device: str, lead: bool):
    """Compile (unless --no-compile), then stream the generation (rank 0 prints). Returns the
    new tokens, the prompt ids, the start time and the time stamp of each printed token."""
    import torch

    import graphdelta
    from graphdelta.runtime.generate import runner_for
    from graphdelta.runtime.streamer import TokenPrinter

    target = model
    if not args.no_compile:
        try:
            target = graphdelta.compile(model, state_layout=args.state_layout)
        except NotImplementedError as err:
            raise SystemExit(f"unsupported architecture {type(model).__name__}: {err}")
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids[0]
    steps = not args.no_compile and torch.device(device).type == "cpu"  # compiled steps (CUDA: graphs)
    with torch.no_grad():
        # The decode step is compiled (or captured) here, with its progress on stderr: not in the
        # text, and not on the clock of the first token. generate then runs on this runner.
        runner_for(target, 1, len(ids) + args.max_new_tokens, steps).prepare(1, len(ids) + 1,
                                                                            len(ids) + args.max_new_tokens - 1)
        options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, compile_steps=steps,
                       max_batch=1, max_len=len(ids) + args.max_new_tokens)
        printer = TokenPrinter(tokenizer, args.prompt) if lead else None
        start = time.perf_counter()
        try:
            new = graphdelta.generate(target, [ids], max_new_tokens=args.max_new_tokens, seed=args.seed,
                                      stream=printer, **options)[0]
        finally:  # what was held back, and the line break, even after Ctrl-C
            if printer is not None:
                printer.close()
    return new, ids, start, printer.stamps if printer is not None else []


def load_parallel(path: Path | None, dtype, device: str):
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group (NCCL on GPUs, one per
    ``LOCAL_RANK``; gloo on CPUs) and load ``path`` (default: the embedded model) sharded over
    all ranks, each reading only its slices. Returns ``(model, tokenizer)``."""
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    import graphdelta
    from graphdelta.assets import DEFAULT_MODEL_DIR, OFFLINE

    path = path or DEFAULT_MODEL_DIR
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    model = graphdelta.load(path, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path, **OFFLINE)


def cmd_explain(args: argparse.Namespace) -> int:
    from graphdelta.assets import DEFAULT_MODEL_DIR, CheckpointError, auto_model_class, load_config

    path = args.model or DEFAULT_MODEL_DIR
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise SystemExit(f"--lengths must be positive prompt lengths, comma-separated, got {args.lengths!r}")
    from graphdelta import progress
    from graphdelta.report import main as report_main

    argv = [str(path), "--lengths", args.lengths, "--backend", args.backend, "--state-layout", args.state_layout]
    try:  # a missing path or a folder that is not a model: one line, before anything is loaded
        auto_model_class(load_config(path))
        progress.show(True)
        return report_main(argv)
    except CheckpointError as err:
        raise SystemExit(f"graphdelta explain: {err}") from None


def default_bench_out() -> Path:
    """Where benchmark results go unless told: outside the checkout, whose ``benchmarks/results``
    holds the measurements BENCHMARKS.md cites."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "graphdelta" / "bench"


def _bench_folder() -> Path:
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if not folder.is_dir():
        raise SystemExit("graphdelta bench runs the scripts in benchmarks/ of a source checkout: "
                         "run it from a clone of the repository (pip install -e .)")
    return folder


def cmd_bench(args: argparse.Namespace) -> int:
    folder = _bench_folder()
    names = BENCHMARKS if args.which == "all" else (args.which if args.which != "ops" else "ops_cpu",)
    args.extra = [a for a in args.extra if a != "--"]
    if "--help" in args.extra:
        if len(names) > 1:
            raise SystemExit("graphdelta bench all --help: ask one script, e.g. graphdelta bench prefill --help")
    elif "kernels" in names and args.gpu:
        _device("cuda")
    out = (args.out or default_bench_out()).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out: {out} is a file: give a folder for the results")
    os.environ["GRAPHDELTA_BENCH_RESULTS"] = str(out)  # read by benchmarks/common.py
    sys.path.insert(0, str(folder))
    for i, name in enumerate(names, 1):
        if len(names) > 1:
            print(f"[{i}/{len(names)}] benchmarks/{name}.py", flush=True)
        saved = sys.argv
        sys.argv = [f"graphdelta bench {args.which if len(names) == 1 else name}", *args.extra]
        try:
            runpy.run_path(str(folder / f"{name}.py"), run_name="__main__")
        finally:
            sys.argv = saved
    print(f"results in {out}")
    return 0


def bench_options() -> str:
    """Each benchmark script's options, from its own parser (for ``bench --help``)."""
    lines = []
    for name in BENCHMARKS + SEPARATE_BENCHMARKS:
        path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
        if path.is_file():
            text = path.read_text()
            calls = re.findall(r"add_argument\(\s*\"(--[\w-]+)\"([^\n]*)", text)
            flags = {flag for flag, rest in calls if "SUPPRESS" not in rest}
            if "add_device_arguments(" in text:
                flags |= {"--device", "--dtype"}
            flags = sorted(flags)
            lines.append(f"  {'ops' if name == 'ops_cpu' else name:9s}{' '.join(flags) or '(none)'}")
    return "options of each script (graphdelta bench NAME --help for details):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphdelta", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="compile a model and stream a generation")
    gen.add_argument("--model", type=Path, default=None,
                     help="local transformers checkpoint folder (default: the embedded tiny Qwen3-Next)")
    gen.add_argument("--prompt", default="import os\n\n\ndef ", help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    gen.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    gen.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda needs a GPU")
    gen.add_argument("--state-layout", choices=("auto", "kv", "vk"), default="auto",
                     help="recurrent-state layout; auto measures on this device")
    gen.add_argument("--no-compile", action="store_true", help="run the model as loaded (graphdelta's "
                     "runtime and ops, without graphdelta.compile or compiled decode steps)")
    gen.set_defaults(fn=cmd_generate)

    exp = sub.add_parser("explain", help="compile a model and report, per layer, what was fused")
    exp.add_argument("model", nargs="?", default=None,
                     help="model folder or config.json (default: the embedded model); random weights "
                          "when the folder holds no weights")
    exp.add_argument("--lengths", default="100,300", help="prompt lengths to run, comma-separated")
    exp.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                     help="what compiles the rewritten graph (aot_eager is fastest to compile)")
    exp.add_argument("--state-layout", default="auto", choices=("auto", "kv", "vk"))
    exp.set_defaults(fn=cmd_explain)

    bench = sub.add_parser("bench", help="run benchmark scripts (JSON, Markdown, PNG into --out)",
                           epilog=bench_options(), formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("which", choices=("ops", "kernels", "compile", "prefill", "decode", "all",
                                         *SEPARATE_BENCHMARKS),
                       help="ops: CPU chunk op vs transformers; kernels: prefill/decode vs roofline; "
                            "compile: compile time and prefill; prefill: eager and graphdelta taking "
                            "turns; decode: generation steps; all: those five; tp: 1 vs 2 processes "
                            "(tensor parallel); llamacpp: against llama.cpp (needs llama-cpp-python)")
    bench.add_argument("--gpu", action="store_true", help="require a GPU (kernels at full size)")
    bench.add_argument("--out", type=Path, default=None,
                       help=f"folder for the results (default {default_bench_out()}, outside the checkout)")
    bench.set_defaults(fn=cmd_bench)

    # Its options are python -m graphdelta.fuzz's own (main() hands them over unparsed).
    sub.add_parser("fuzz", help="hypothesis fuzzing of an implementation against the reference "
                   "(graphdelta fuzz --help for its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fuzz"]:
        from graphdelta import fuzz

        return fuzz.main(argv[1:])
    parser = build_parser()
    if argv[:1] == ["bench"] and len(argv) > 2 and not {"-h", "--help"}.isdisjoint(argv[2:]):
        # `bench NAME --help` is the script's own help, not bench's
        argv = [a for a in argv if a not in ("-h", "--help")] + ["--", "--help"]
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra  # bench: passed on to the benchmark script
    from graphdelta import progress

    shown = progress.setting()
    try:
        return args.fn(args)
    finally:  # (commands turn progress on; an in-process caller gets its setting back)
        progress.show(shown)


if __name__ == "__main__":
    sys.exit(main())
