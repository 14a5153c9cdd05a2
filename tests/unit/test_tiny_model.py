"""The tiny offline model: reproducible bytes, a tokenizer that round-trips, a chat template that renders."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvlab.tiny_model import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END,
    IM_START,
    PAD_TOKEN,
    TinyModelSpec,
    format_summary,
    write_tiny_model,
)

# Small enough that writing it takes well under a second.
SMALL = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, max_positions=256)


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return out, write_tiny_model(out, TinyModelSpec(**SMALL, seed=0))


def test_writes_the_files_vllm_and_transformers_read(small_model):
    out, _ = small_model
    assert set(digests(out)) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                 "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == 512


def test_same_seed_gives_identical_bytes_and_another_seed_other_weights(small_model, tmp_path):
    out, _ = small_model
    again = write_tiny_model(tmp_path / "again", TinyModelSpec(**SMALL, seed=0))
    other = write_tiny_model(tmp_path / "other", TinyModelSpec(**SMALL, seed=1))
    assert digests(out) == digests(Path(again["path"]))
    other_digests = digests(Path(other["path"]))
    assert other_digests["model.safetensors"] != digests(out)["model.safetensors"]
    # The tokenizer does not depend on the seed: models of one shape share token ids.
    assert other_digests["tokenizer.json"] == digests(out)["tokenizer.json"]


def test_weights_match_the_config_shapes(small_model):
    from safetensors import safe_open

    out, summary = small_model
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [512, 64]
        assert f.get_slice("model.layers.1.self_attn.k_proj.weight").get_shape() == [2 * 16, 64]
    assert "lm_head.weight" in keys and "model.layers.1.mlp.down_proj.weight" in keys
    assert summary["params"] > 0


def test_qwen2_has_qkv_biases(tmp_path):
    from safetensors import safe_open

    write_tiny_model(tmp_path, TinyModelSpec(**SMALL, arch="qwen2"))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "model.layers.0.self_attn.q_proj.bias" in set(f.keys())


def test_kv_bytes_per_token_of_the_defaults():
    spec = TinyModelSpec()
    # K and V x 8 layers x 8 KV heads x 64 dims x 2 bytes (bf16)
    assert spec.kv_bytes_per_token == 2 * 8 * 8 * 64 * 2 == 16 * 1024
    assert spec.max_positions >= 4096
    assert TinyModelSpec(dtype="float32").kv_bytes_per_token == 32 * 1024


def test_summary_names_params_and_kv_per_token(small_model):
    text = format_summary(small_model[1])
    assert "params" in text and f"{TinyModelSpec(**SMALL).kv_bytes_per_token} bytes/token" in text


@pytest.mark.parametrize("bad, message", [
    (dict(hidden=65), "multiple of heads"),
    (dict(kv_heads=3), "multiple of kv_heads"),
    (dict(vocab=100), "vocab must be at least"),
])
def test_invalid_shapes_are_refused_with_the_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        TinyModelSpec(**{**SMALL, **bad}).validate()


def test_tokenizer_round_trips_and_has_exactly_vocab_tokens(small_model):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(small_model[0] / "tokenizer.json"))
    assert tok.get_vocab_size() == 512
    for text in ["Hello, world!", "  leading spaces and\nnewlines\t", "Ünïcode ✓ 日本語", ""]:
        assert tok.decode(tok.encode(text).ids) == text


def test_transformers_loads_it_and_renders_the_chat_template(small_model):
    from transformers import AutoConfig, AutoTokenizer

    out = small_model[0]
    assert AutoConfig.from_pretrained(out).model_type == "llama"
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        tokenize=False, add_generation_prompt=True)
    assert rendered == (f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi there{IM_END}\n"
                        f"{IM_START}assistant\n")
    ids = tok.encode(rendered, add_special_tokens=False)
    assert tok.convert_tokens_to_ids(IM_START) in ids  # the markers are single special tokens
    assert tok.decode(ids) == rendered


def test_cli_writes_a_model_and_prints_the_summary(tmp_path, capsys):
    from kvlab.cli import main

    assert main(["tiny-model", str(tmp_path / "m"), "--layers", "1", "--hidden", "64", "--heads", "2",
                 "--kv-heads", "1", "--intermediate", "64", "--vocab", "300", "--seed", "3"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 1


def test_missing_generator_packages_name_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "safetensors" else real(name, *a))
    with pytest.raises(ImportError, match=r"safetensors: `pip install kvlab\[tiny-model\]`"):
        write_tiny_model(tmp_path / "m")
    assert not (tmp_path / "m").exists(), "nothing is written when the generator cannot run"


def test_runs_starting_together_share_one_whole_default_model(tmp_path, monkeypatch):
    # Sweep runs placed on one node all ask for the default model at once; each must find it whole, and the
    # losers' copies must not be left behind. A half-written directory (an interrupted old writer) is replaced.
    target = tmp_path / "models" / "tiny"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half")
    code = ("import json, sys; from kvlab.notebooks.defaults import tiny_model; p = tiny_model(); "
            "json.loads((p / 'config.json').read_text()); assert (p / 'tokenizer.json').is_file(); print(p)")
    env = {**os.environ, "KVLAB_TINY_MODEL": str(target)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(target)}
    assert (target / "model.safetensors").stat().st_size > 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no staging copies left


def test_a_folder_that_is_not_a_model_is_never_replaced(tmp_path, monkeypatch):
    from kvlab.notebooks.defaults import tiny_model

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    monkeypatch.setenv("KVLAB_TINY_MODEL", str(folder))
    with pytest.raises(FileExistsError, match="not a tiny model"):
        tiny_model()
    assert (folder / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
