"""Prompts for workloads: synthetic prompts of an exact token count, a list of strings, or a JSONL file.

Exact, as the server counts them: a synthetic prompt is fitted with the server's own `/tokenize` and
`/detokenize` endpoints (vLLM has both), so `usage.prompt_tokens` equals the number asked for, whatever the
model's tokenizer. Each request gets a different prompt by default (random words from a seeded generator):
identical prompts would hit vLLM's prefix cache and hide the KV memory a workload is meant to use.
Fitted prompts are cached per (server, model, length, variant), so a second run costs no requests.
"""
from __future__ import annotations

import json
import random
import threading
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, Union, runtime_checkable

from kvlab.load.client import post_json, root_url

# Plain, common words: any BPE tokenizer splits them into few tokens, so fitting converges fast.
_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health "
    "person art war history party result change morning reason research girl guy moment air teacher force "
    "education river garden memory window paper light music table green small large quick bright"
).split()


@runtime_checkable
class PromptSource(Protocol):
    """Anything that can hand out the prompts for `count` requests to one server."""

    def take(self, count: int, *, url: str, model: str, seed: int = 0) -> list[str]: ...


class TokenizeUnavailable(RuntimeError):
    pass


_cache: dict[tuple[str, str, int, int, int], str] = {}
_specials: dict[tuple[str, str], int] = {}
_lock = threading.Lock()


def _tokenize(url: str, model: str, text: str, special: bool) -> list[int]:
    try:
        out = post_json(root_url(url) + "/tokenize",
                        {"model": model, "prompt": text, "add_special_tokens": special}, timeout=60)
    except (urllib.error.URLError, RuntimeError) as e:
        raise TokenizeUnavailable(
            f"{root_url(url)}/tokenize failed ({e}): synthetic prompts need a vLLM server's /tokenize; "
            "pass a list of prompts or --prompts-file instead") from None
    return list(out["tokens"])


def _detokenize(url: str, model: str, tokens: list[int]) -> str:
    return post_json(root_url(url) + "/detokenize", {"model": model, "tokens": tokens}, timeout=60)["prompt"]


def special_token_count(url: str, model: str) -> int:
    """Tokens the server adds to every prompt (a BOS, usually)."""
    key = (root_url(url), model)
    with _lock:
        if key in _specials:
            return _specials[key]
    n = len(_tokenize(url, model, "", special=True))
    with _lock:
        _specials[key] = n
    return n


def _words(variant: int, seed: int, count: int) -> str:
    rng = random.Random(f"{seed}:{variant}")
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def synthetic_prompt(url: str, model: str, tokens: int, variant: int = 0, seed: int = 0) -> str:
    """A prompt the server counts as exactly `tokens` prompt tokens (special tokens included).

    ValueError when `tokens` is below what the server adds by itself; TokenizeUnavailable when the server
    has no /tokenize.
    """
    key = (root_url(url), model, tokens, variant, seed)
    with _lock:
        if key in _cache:
            return _cache[key]
    specials = special_token_count(url, model)
    need = tokens - specials
    if need < 1:
        raise ValueError(f"a prompt of {tokens} tokens is too short: the server adds {specials} special "
                         f"token(s) to every prompt; ask for at least {specials + 1}")
    n_words = need + 8
    while True:
        ids = _tokenize(url, model, _words(variant, seed, n_words), special=False)
        if len(ids) >= need + 8:
            break
        n_words *= 2
    # Cutting a token list and detokenizing can merge tokens at the cut; adjust until the count is exact.
    cut = need
    for _ in range(16):
        text = _detokenize(url, model, ids[:cut])
        got = len(_tokenize(url, model, text, special=True))
        if got == tokens:
            with _lock:
                _cache[key] = text
            return text
        cut += tokens - got
        if cut < 1 or cut > len(ids):
            break
    raise RuntimeError(f"could not fit a prompt of exactly {tokens} tokens on {root_url(url)} (last: {got}); "
                       "use a prompts file instead")


@dataclass(frozen=True)
class SyntheticPrompts:
    """Prompts of exactly `tokens` tokens; `distinct` different ones cycled (None: one per request)."""

    tokens: int
    distinct: int | None = None
    workers: int = 8

    def take(self, count: int, *, url: str, model: str, seed: int = 0) -> list[str]:
        kinds = count if self.distinct is None else min(count, self.distinct)
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            texts = list(pool.map(lambda v: synthetic_prompt(url, model, self.tokens, v, seed), range(kinds)))
        return [texts[i % kinds] for i in range(count)] if kinds else []


@dataclass(frozen=True)
class PromptList:
    """Given prompts, cycled in order."""

    prompts: tuple[str, ...]

    def __init__(self, prompts: Sequence[str]) -> None:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("PromptList needs a non-empty sequence of strings")
        object.__setattr__(self, "prompts", tuple(prompts))

    def take(self, count: int, *, url: str = "", model: str = "", seed: int = 0) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(count)]


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts of a JSONL file (`{"prompt": ...}` or `{"text": ...}` per line) or, for any other suffix,
    one prompt per non-empty line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts: list[str] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix in (".jsonl", ".ndjson"):
                row = json.loads(line)
                text = row.get("prompt", row.get("text")) if isinstance(row, dict) else row
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": \"...\"}}")
                prompts.append(text)
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt")
    return prompts


def prompts_file(path: str | Path) -> PromptList:
    return PromptList(read_prompts_file(path))


PromptsLike = Union[PromptSource, int, Sequence[str], Path]


def as_prompt_source(prompts: PromptsLike) -> PromptSource:
    """An int means synthetic prompts of that many tokens, a Path a prompts file, a str one prompt, a
    sequence of strings a PromptList."""
    if isinstance(prompts, bool):
        raise TypeError("prompts must be an int, a list of strings, a Path or a PromptSource")
    if isinstance(prompts, int):
        return SyntheticPrompts(prompts)
    if isinstance(prompts, Path):
        return prompts_file(prompts)
    if isinstance(prompts, str):
        return PromptList([prompts])
    if isinstance(prompts, PromptSource):
        return prompts
    return PromptList(list(prompts))
