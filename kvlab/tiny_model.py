"""A tiny random-weight model that vLLM can serve offline.

No model can be downloaded on the machines kvlab targets for CI, so the lab makes its own: a Llama or
Qwen2 config, random weights in safetensors, and a byte-level BPE tokenizer trained on text shipped in
this module. The defaults trade compute for KV size on purpose: few parameters (fast on 2 CPU cores) but
many KV heads (16 KiB of KV per token in bf16), so a burst of requests visibly fills the KV pool.

Everything is a pure function of the spec and the seed: the same seed gives byte-identical files.

It needs torch, safetensors and tokenizers: vLLM brings all three, and `pip install kvlab[tiny-model]` names them.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Arch = Literal["llama", "qwen2"]

_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]

# ChatML, as Qwen uses: lets `/v1/chat/completions` render prompts for the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Built-in training text for the tokenizer (never read from the system, so the result is reproducible).
_PARAGRAPH = (
    "An elastic key value cache reserves virtual address space for the whole pool of attention blocks "
    "and backs each page with physical memory only while a request holds blocks on it. When the burst "
    "of requests is over, the pages go back to the system, and another model served on the same device "
    "can use them. The lab launches serving engines, drives bursty workloads, samples memory on the same "
    "clock as the requests, and writes tidy results: parameters, environment, per request records, the "
    "memory timeline, a summary and figures. Hello, world! The quick brown fox jumps over the lazy dog. "
    "What is the capital of France? Paris is the capital of France. One, two, three, four, five, six, "
    "seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 1000 2048 4096. "
    "System: you are a helpful assistant. User: tell me a story. Assistant: once upon a time, "
)
_WORDS = (
    "the of and to in is it that for on with as was by at be this from or have an are not but which one "
    "all were we when your can said there use each she do how their if will up other about out many then "
    "them these so some her would make like him into time has look two more write go see number no way "
    "could people my than first water been call who oil its now find long down day did get come made may "
    "part memory cache block page token model server request burst latency throughput budget pool share "
    "engine serve scheduler worker kernel tensor layer head attention prompt answer question story value "
    "key virtual physical reserve release grow shrink idle peak sample clock record summary figure plot"
).split()
_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "ng", "st"]


def _training_corpus() -> list[str]:
    """The tokenizer's training text: a paragraph, a word list, and pseudo-words built from syllables.

    The pseudo-words give BPE enough distinct pieces to reach a few thousand merges. A fixed internal seed
    keeps the tokenizer identical for every model seed.
    """
    rng = random.Random(20240611)
    lines = [_PARAGRAPH, " ".join(_WORDS)]
    for _ in range(400):
        words = []
        for _ in range(24):
            if rng.random() < 0.5:
                words.append(rng.choice(_WORDS))
            else:
                words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model. Defaults: about 25M parameters, 16 KiB of bf16 KV cache per token."""

    arch: Arch = "llama"
    layers: int = 8
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 8
    intermediate: int = 1024
    vocab: int = 4096
    max_positions: int = 4096
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, for every layer and KV head, in the model's dtype."""
        itemsize = 2 if self.dtype == "bfloat16" else 4
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize

    def validate(self) -> None:
        if self.arch not in _ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}: choose one of {sorted(_ARCHITECTURES)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.vocab < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab must be at least {256 + len(SPECIAL_TOKENS)} (the byte alphabet + specials)")


def build_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    """Train a byte-level BPE tokenizer with exactly `vocab_size` tokens.

    Exactly, because a random model samples every id of its embedding: an id the tokenizer lacks would
    break detokenization. When the corpus runs out of merges, filler tokens make up the difference.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    shortfall = vocab_size - tokenizer.get_vocab_size()
    if shortfall > 0:
        tokenizer.add_tokens([f"<|filler_{i}|>" for i in range(shortfall)])
    assert tokenizer.get_vocab_size() == vocab_size, "tokenizer vocab must match the embedding"
    return tokenizer


def _config(spec: TinyModelSpec, tokenizer) -> dict:
    architecture, model_type = _ARCHITECTURES[spec.arch]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": spec.vocab,
        "tie_word_embeddings": False,
        "torch_dtype": spec.dtype,
        "bos_token_id": tokenizer.token_to_id(BOS_TOKEN),
        "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
        "pad_token_id": tokenizer.token_to_id(PAD_TOKEN),
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if spec.arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.layers)
    return config


def _weights(spec: TinyModelSpec) -> dict:
    """Random weights named as the HF checkpoints are, drawn from one seeded generator in a fixed order."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
    h, kv = spec.hidden, spec.kv_heads * spec.head_dim

    def normal(*shape: int) -> "torch.Tensor":
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def ones(n: int) -> "torch.Tensor":
        return torch.ones(n, dtype=dtype)

    def zeros(n: int) -> "torch.Tensor":
        return torch.zeros(n, dtype=dtype)

    tensors = {"model.embed_tokens.weight": normal(spec.vocab, h)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(h, h)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv, h)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv, h)
        tensors[p + "self_attn.o_proj.weight"] = normal(h, h)
        if spec.arch == "qwen2":  # Qwen2 has biases on q, k, v.
            tensors[p + "self_attn.q_proj.bias"] = zeros(h)
            tensors[p + "self_attn.k_proj.bias"] = zeros(kv)
            tensors[p + "self_attn.v_proj.bias"] = zeros(kv)
        tensors[p + "mlp.gate_proj.weight"] = normal(spec.intermediate, h)
        tensors[p + "mlp.up_proj.weight"] = normal(spec.intermediate, h)
        tensors[p + "mlp.down_proj.weight"] = normal(h, spec.intermediate)
        tensors[p + "input_layernorm.weight"] = ones(h)
        tensors[p + "post_attention_layernorm.weight"] = ones(h)
    tensors["model.norm.weight"] = ones(h)
    tensors["lm_head.weight"] = normal(spec.vocab, h)
    return tensors


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _require_generator_packages() -> None:
    """ImportError that names the fix, before any file is written, when a package the generator needs is missing."""
    import importlib.util

    missing = [m for m in ("torch", "safetensors", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the tiny model generator needs {', '.join(missing)}: `pip install kvlab[tiny-model]` "
                          "(vLLM brings them too: `make setup`)")


def write_tiny_model(directory: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> dict:
    """Write the model to `directory` (created if needed) and return a summary dict.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json.
    """
    _require_generator_packages()
    from safetensors.torch import save_file

    spec.validate()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab)
    config = _config(spec, tokenizer)
    tensors = _weights(spec)
    # Fixed metadata only: a timestamp or version here would break byte-identical output.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "do_sample": False,
    })
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": spec.max_positions,
        "clean_up_tokenization_spaces": False,
    })
    _write_json(out / "special_tokens_map.json", {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
    })
    params = sum(t.numel() for t in tensors.values())
    return {
        "path": str(out),
        **asdict(spec),
        "params": params,
        "kv_bytes_per_token": spec.kv_bytes_per_token,
    }


def format_summary(summary: dict) -> str:
    """One human-readable block: what was written and how much KV a token costs."""
    kv = summary["kv_bytes_per_token"]
    return (
        f"tiny model ({summary['arch']}) written to {summary['path']}\n"
        f"  layers={summary['layers']} hidden={summary['hidden']} heads={summary['heads']} "
        f"kv_heads={summary['kv_heads']} head_dim={summary['hidden'] // summary['heads']} "
        f"intermediate={summary['intermediate']} vocab={summary['vocab']} "
        f"max_positions={summary['max_positions']} dtype={summary['dtype']} seed={summary['seed']}\n"
        f"  params: {summary['params'] / 1e6:.2f} M\n"
        f"  KV cache: {kv} bytes/token ({kv / 1024:.1f} KiB); "
        f"1 GiB holds {(1 << 30) // kv} tokens"
    )
