"""The newcomer path: the main example end to end on the embedded model, and every CLI command
(--help and a tiny invocation each)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict | None = None, timeout: int = 600) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_generate_example_end_to_end():
    out = run("examples/generate.py", "--prompt", "import os\n", "--max-new-tokens", "12",
              "--backend", "eager", "--prefill-tokens", "64")
    assert "replaced torch_chunk_gated_delta_rule -> graphdelta::chunk_gated_delta_rule" in out
    assert "logits vs eager: relative error" in out
    error = float(out.split("logits vs eager: relative error ")[1].split()[0])
    assert error < 1e-4
    assert "greedy tokens match transformers eager: yes (12 tokens)" in out


CLI = ("-m", "graphdelta.cli")


HELP = """
import contextlib, io
from graphdelta import cli
def output(argv):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            cli.main(argv)
        except SystemExit as e:
            assert e.code in (0, None), (argv, e.code)
    return text.getvalue()
for command in ([], ["generate"], ["explain"], ["bench"], ["fuzz"]):
    assert "usage:" in output([*command, "--help"]), command
bench = output(["bench", "--help"])
assert "--out" in bench and "ops      --gate-scale --lengths --repeats" in bench, bench  # each script's options
script = output(["bench", "ops", "--help"])
assert "--lengths LENGTHS" in script and "--gpu" not in script, script  # the script's own help
assert output(["--version"]).startswith("graphdelta 0.1.0 (Python 3.")
print("every help ok")
"""


def test_cli_help():
    """Every command's --help, bench's help of each script, --version, in one process
    (importing torch costs 4 s a process)."""
    assert "every help ok" in run("-c", HELP)


def test_cli_generate_streams_text():
    """Multi-byte characters stream whole (no U+FFFD from a character split over tokens); the
    speed line goes to stderr, after the text."""
    prompt = "# café → 世界 🙂\ndef "
    result = subprocess.run([sys.executable, *CLI, "generate", "--no-compile", "--prompt", prompt,
                             "--max-new-tokens", "6"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(prompt) and len(out.rstrip("\n")) > len(prompt) and "\ufffd" not in out, out
    assert "6 tokens: first after" in result.stderr and "tokens/s (batch 1" in result.stderr, result.stderr


class Pieces:
    """A file that keeps every write."""

    def __init__(self):
        self.pieces = []

    def write(self, text):
        self.pieces.append(text)

    def flush(self):
        pass


def test_progress_lines(monkeypatch, capsys):
    """Off by default where stderr is not a terminal; on, a start and an end line; the
    environment overrides both."""
    from graphdelta import progress

    monkeypatch.delenv("GRAPHDELTA_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "_shown", None)
    with progress.phase("quiet") as shown:
        shown.note("nothing shows")
    assert capsys.readouterr().err == ""
    progress.show(True)
    with progress.phase("compiling x"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "graphdelta: compiling x ..." and err[1].startswith("graphdelta: compiling x: done in ")
    with pytest.raises(KeyboardInterrupt), progress.phase("compiling y"):
        raise KeyboardInterrupt
    assert "graphdelta: compiling y: failed after " in capsys.readouterr().err
    monkeypatch.setattr(progress, "stdout_at_line_start", False)  # streamed text left mid-line
    with progress.phase("z"):
        pass
    assert capsys.readouterr().err.startswith("\ngraphdelta: z ...")
    monkeypatch.setenv("GRAPHDELTA_PROGRESS", "0")
    with progress.phase("off"):
        pass
    assert capsys.readouterr().err == ""


def test_streamer_keeps_characters_whole():
    """Tokens of text whose characters span several byte-level tokens, streamed one at a time:
    no piece holds half a character, and the pieces make the text."""
    from graphdelta.assets import load_default_model
    from graphdelta.runtime.streamer import TokenPrinter

    _, tokenizer = load_default_model()
    text = "naïve café → 世界 🙂 ok\nünïcödé\n\n"
    tokens = tokenizer(text).input_ids
    assert len(tokens) > len(text)  # multi-byte characters are split over tokens
    out = Pieces()
    printer = TokenPrinter(tokenizer, "prompt: ", out)
    for token in tokens:
        printer(0, token)
    printer.close()
    assert "".join(out.pieces) == "prompt: " + text + "\n"
    assert not any("\ufffd" in piece for piece in out.pieces), out.pieces
    assert len(printer.stamps) == len(tokens)
    with pytest.raises(ValueError, match="streams one sequence"):
        printer(1, tokens[0])
    out = Pieces()
    TokenPrinter(tokenizer, "no token came", out).close()
    assert "".join(out.pieces) == "no token came\n"


def test_one_line_for_transformers_fallback_notes(caplog):
    """transformers' notes about flash-linear-attention and causal_conv1d fallbacks become one
    line; other packages' notes pass unchanged."""
    import logging

    from graphdelta import hf

    logger = logging.getLogger("transformers.integrations.hub_kernels")
    hf.quiet_kernel_fallbacks()
    hf.quiet_kernel_fallbacks()  # idempotent
    assert sum(isinstance(f, hf._OneFallbackNote) for f in logger.filters) == 1
    note = "`{}` is falling back to its reference PyTorch implementation because `{}` is not installed."
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(note.format("mamba_chunk_scan", "mamba_ssm"))
        for fn, package in (("chunk_gated_delta_rule", "flash-linear-attention"), ("causal_conv1d_fn", "causal_conv1d"),
                            ("fused_recurrent_gated_delta_rule", "flash-linear-attention")):
            logger.warning(note.format(fn, package))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == note.format("mamba_chunk_scan", "mamba_ssm")
    assert len(messages) <= 2 and all("mamba" in m or "graphdelta.compile runs its own ops" in m for m in messages)


def test_cli_explain_reports_every_linear_layer():
    out = run(*CLI, "explain", "--backend", "eager", "--lengths", "20")
    for layer in (0, 1, 2):
        assert f"layer model.layers.{layer}.linear_attn" in out
    assert "graphs compiled so far" in out


def test_cli_bench_and_fuzz(tmp_path):
    """bench writes into --out (never into the checkout: benchmarks/results holds the measured
    files BENCHMARKS.md cites); fuzz runs."""
    tracked = {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").iterdir()}
    out = run(*CLI, "bench", "ops", "--lengths", "64", "--repeats", "1", "--out", str(tmp_path / "bench"))
    assert (tmp_path / "bench" / "ops_cpu.json").exists() and "| 64 |" in out
    assert f"results in {tmp_path / 'bench'}" in out
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").iterdir()} == tracked
    out = run(*CLI, "fuzz", "--impl", "chunk", "--examples", "3", "--seed", "0")
    assert "[chunk] OK: 3 problems" in out


def test_cli_errors_say_what_to_do():
    result = subprocess.run([sys.executable, *CLI, "generate", "--model", "/nonexistent"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "give a local transformers checkpoint folder" in result.stderr


def test_layout_study_example_runs():
    out = run("examples/layout_study.py", "--batches", "1", "--repeats", "2")
    assert "vk speedup" in out


@pytest.mark.slow  # 48 s: 9 interpreted kernel problems; `graphdelta fuzz` (the same fuzz.run) runs below
def test_fuzz_example_runs():
    out = run("examples/fuzz_kernels.py", "--examples", "3")
    assert "all implementations agree with the reference" in out
