"""`kvlab tiny-model DIR`: write an offline random-weight model with its tokenizer."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from kvlab.tiny_model import TinyModelSpec

    d = TinyModelSpec()
    p = sub.add_parser("tiny-model", help="write a tiny random-weight model vLLM can serve offline",
                       description=__doc__)
    p.add_argument("directory", metavar="DIR", help="output directory (created if needed)")
    p.add_argument("--arch", choices=["llama", "qwen2"], default=d.arch)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--max-positions", type=int, default=d.max_positions)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=d.dtype)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.tiny_model import TinyModelSpec, format_summary, write_tiny_model

    spec = TinyModelSpec(arch=args.arch, layers=args.layers, hidden=args.hidden, heads=args.heads,
                         kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                         max_positions=args.max_positions, dtype=args.dtype, seed=args.seed)
    try:
        spec.validate()
    except ValueError as e:
        raise SystemExit(f"kvlab tiny-model: {e}") from None
    try:
        print(format_summary(write_tiny_model(args.directory, spec)))
    except ImportError as e:
        raise SystemExit(f"kvlab tiny-model: {e}") from None
    return 0
