"""Loading and the command line refuse bad input in one line, before anything slow: generate's
arguments before a model is loaded or compiled, explain's path before report runs, a truncated,
garbled or mismatched checkpoint by name, a checkpoint's own code never run, fuzz's example
count. In-process calls of ``graphdelta.cli.main`` on copies of the shipped checkpoint."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import graphdelta.assets as assets
import graphdelta.report as report
from graphdelta import cli
from graphdelta.assets import DEFAULT_MODEL_DIR, CheckpointError, load_checkpoint, load_config

SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def checkpoint(folder, weights: bytes | dict | None = None):
    """A copy of the shipped checkpoint in ``folder``: its weights, other bytes, or a state dict."""
    folder.mkdir()
    for name in SMALL_FILES:
        shutil.copy(DEFAULT_MODEL_DIR / name, folder / name)
    target = folder / "model.safetensors"
    if weights is None:
        shutil.copy(DEFAULT_MODEL_DIR / "model.safetensors", target)
    elif isinstance(weights, bytes):
        target.write_bytes(weights)
    else:
        save_file(weights, str(target), metadata={"format": "pt"})
    return folder


def mismatched(folder):
    state = load_file(str(DEFAULT_MODEL_DIR / "model.safetensors"))
    del state["model.layers.0.linear_attn.conv1d.weight"]
    state["extra.weight"] = torch.zeros(2)
    return checkpoint(folder, state)


def fail(*args, **kwargs):
    raise AssertionError("nothing may be loaded or run for arguments that are refused")


def exits(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("argv,message", [
    (["generate", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 0, got -5"),
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate", "--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["generate", "--top-p", "1.5"], "--top-p must be a number in (0, 1], got 1.5"),
    (["generate", "--top-k", "0"], "--top-k must be an int >= 1, got 0"),
    (["generate", "--model", "/no/such/folder"], "--model: /no/such/folder does not exist"),
])
def test_generate_arguments_are_refused_before_loading(monkeypatch, argv, message):
    monkeypatch.setattr(assets, "load_model", fail)
    exits(argv, message)


def test_bench_arguments_are_refused_before_running(monkeypatch, tmp_path):
    monkeypatch.setattr(cli.runpy, "run_path", fail)
    (tmp_path / "file").write_text("")
    exits(["bench", "ops", "--out", str(tmp_path / "file")], "is a file: give a folder for the results")
    exits(["bench", "all", "--help"], "ask one script, e.g. graphdelta bench prefill --help")


@pytest.mark.parametrize("make,message", [
    (lambda tmp: tmp / "absent", "does not exist: give a local transformers checkpoint folder"),
    (lambda tmp: tmp, "has no config.json"),
    (lambda tmp: checkpoint(tmp / "garbled", b"\x00\xff" * 2000), "cannot read the weights in"),
    (lambda tmp: checkpoint(tmp / "truncated", (DEFAULT_MODEL_DIR / "model.safetensors").read_bytes()[:100_000]),
     "(SafetensorError: Error while deserializing header: incomplete metadata"),
    (lambda tmp: mismatched(tmp / "mismatched"), "missing keys: model.layers.0.linear_attn.conv1d.weight; unexpected keys: extra.weight"),
])
@pytest.mark.parametrize("command", ["explain", "generate"])
def test_bad_checkpoints_are_one_line_errors(monkeypatch, tmp_path, make, message, command):
    monkeypatch.setattr(report, "explain", fail)  # explain never gets as far as compiling
    path = str(make(tmp_path))
    exits([command, path] if command == "explain" else [command, "--model", path, "--no-compile"], message)


def test_the_api_warns_of_mismatched_weights_and_names_them(tmp_path):
    path = mismatched(tmp_path / "ck")
    with pytest.warns(UserWarning, match="missing keys: model.layers.0.linear_attn.conv1d.weight; unexpected keys: "
                                         "extra.weight\\): those weights are random"):
        model = load_checkpoint(path)
    assert not model.training
    with pytest.raises(CheckpointError, match="does not match Qwen3NextForCausalLM"):
        load_checkpoint(path, strict=True)


def test_a_checkpoints_own_code_is_never_run(tmp_path):
    """An unknown model type with an ``auto_map`` asked interactively whether to run its code."""
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "graphdelta_unknown",
                                                    "auto_map": {"AutoConfig": "modeling.Config"}}))
    with pytest.raises(CheckpointError, match="holds no config transformers can read"):
        load_config(folder)


def test_loading_is_offline_and_runs_no_checkpoint_code(monkeypatch):
    """Every ``from_pretrained`` of a load (config, model, tokenizer) gets local_files_only=True
    and trust_remote_code=False: the path is local, and an unknown ``auto_map`` must not prompt."""
    import transformers

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("local_files_only"), kwargs.get("trust_remote_code")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    assets.load_model(DEFAULT_MODEL_DIR)
    assert {name for name, *_ in seen} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(call[1:] == (True, False) for call in seen), seen


def test_fuzz_needs_an_example(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["fuzz", "--examples", "0"])
    assert info.value.code == 2 and "--examples must be at least 1, got 0" in capsys.readouterr().err
