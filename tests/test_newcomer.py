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
for command in ([], ["generate"], ["explain"], ["bench"], ["fuzz"]):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            cli.main([*command, "--help"])
        except SystemExit as e:
            assert e.code in (0, None), (command, e.code)
    assert "usage:" in text.getvalue(), (command, text.getvalue())
print("every help ok")
"""


def test_cli_help():
    """Every command's --help, in one process (importing torch costs 4 s a process)."""
    assert "every help ok" in run("-c", HELP)


def test_cli_generate_streams_text():
    out = run(*CLI, "generate", "--no-compile", "--prompt", "def ", "--max-new-tokens", "6")
    assert out.startswith("def ") and len(out.rstrip("\n")) > len("def ")


def test_cli_explain_reports_every_linear_layer():
    out = run(*CLI, "explain", "--backend", "eager", "--lengths", "20")
    for layer in (0, 1, 2):
        assert f"layer model.layers.{layer}.linear_attn" in out
    assert "graphs compiled so far" in out


def test_cli_bench_and_fuzz(tmp_path):
    out = run(*CLI, "bench", "ops", "--lengths", "64", "--repeats", "1",
              env={"GRAPHDELTA_BENCH_RESULTS": str(tmp_path)})
    assert (tmp_path / "ops_cpu.json").exists() and "| 64 |" in out
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
