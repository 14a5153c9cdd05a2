"""Prompts for workloads: synthetic prompts of an exact token count, a list of strings, or a JSONL file.

Exact, as the server counts them: a synthetic prompt is fitted with the server's own `/tokenize` and
`/detokenize` endpoints (vLLM has both), so `usage.prompt_tokens` equals the number asked for, whatever the
model's tokenizer. A server without them (any other OpenAI-compatible server) gets prompts fitted with a local
tokenizer when one is named (`--tokenizer`), else an approximation, with a warning. Each request gets a different
prompt by default (random words from a seeded generator):
identical prompts would hit vLLM's prefix cache and hide the KV memory a workload is meant to use.
Fitted prompts are cached per (server, model, length, variant), so a second run costs no requests.
"""
from __future__ import annotations

import json
import random
import sys
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


class Tokenizer(Protocol):
    """What fitting a prompt needs: token ids of a text (with or without the special tokens the server adds), and
    text of token ids."""

    key: str

    def encode(self, text: str, special: bool) -> list[int]: ...

    def decode(self, tokens: list[int]) -> str: ...


class ServerTokenizer:
    """The server's own `/tokenize` and `/detokenize` (vLLM has both): exact as the server counts."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = root_url(url), model
        self.key = f"server:{self.url}:{model}"

    def encode(self, text: str, special: bool) -> list[int]:
        try:
            out = post_json(self.url + "/tokenize", {"model": self.model, "prompt": text,
                                                     "add_special_tokens": special}, timeout=60)
            return list(out["tokens"])
        except (urllib.error.URLError, RuntimeError, KeyError, TypeError) as e:
            raise TokenizeUnavailable(f"{self.url}/tokenize failed ({e})") from None

    def decode(self, tokens: list[int]) -> str:
        return post_json(self.url + "/detokenize", {"model": self.model, "tokens": tokens}, timeout=60)["prompt"]


class LocalTokenizer:
    """A Hugging Face tokenizer on this machine (a model directory, or a name in the local Hugging Face cache), as
    `vllm bench serve --tokenizer` takes: exact lengths for servers with no `/tokenize`."""

    _loaded: dict[str, object] = {}

    def __init__(self, name_or_path: str) -> None:
        self.key = f"local:{name_or_path}"
        tok = self._loaded.get(name_or_path)
        if tok is None:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ValueError("--tokenizer needs the `transformers` package: pip install transformers") from None
            try:
                tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load tokenizer {name_or_path!r} from this machine ({e}): give a model "
                                 "directory that holds its tokenizer files") from None
            self._loaded[name_or_path] = tok
        self._tok = tok

    def encode(self, text: str, special: bool) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=special))  # type: ignore[attr-defined]

    def decode(self, tokens: list[int]) -> str:
        return str(self._tok.decode(tokens))  # type: ignore[attr-defined]


_cache: dict[tuple[str, int, int, int], str] = {}
_specials: dict[str, int] = {}
_warned: set[str] = set()
_lock = threading.Lock()
# Without any tokenizer: the common words below are one token each for the BPE tokenizers of common models (with
# their leading space), plus one special token (a BOS). An approximation, said so once per server.
APPROX_SPECIAL_TOKENS = 1


def special_token_count(url: str, model: str, tokenizer: Tokenizer | None = None) -> int:
    """Tokens the server adds to every prompt (a BOS, usually)."""
    tok = tokenizer or ServerTokenizer(url, model)
    with _lock:
        if tok.key in _specials:
            return _specials[tok.key]
    n = len(tok.encode("", special=True))
    with _lock:
        _specials[tok.key] = n
    return n


def _words(variant: int, seed: int, count: int) -> str:
    rng = random.Random(f"{seed}:{variant}")
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def approximate_prompt(tokens: int, variant: int = 0, seed: int = 0) -> str:
    """About `tokens` prompt tokens without any tokenizer: one common word a token, one special token."""
    return _words(variant, seed, max(1, tokens - APPROX_SPECIAL_TOKENS))


def synthetic_prompt(url: str, model: str, tokens: int, variant: int = 0, seed: int = 0,
                     tokenizer: str | None = None) -> str:
    """A prompt of exactly `tokens` prompt tokens (special tokens included), as counted by the local `tokenizer`
    when one is named, else by the server's `/tokenize`. A server with no `/tokenize` and no tokenizer named
    gets an approximation (warned once per server), never a refusal.

    ValueError when `tokens` is below what the tokenizer adds by itself."""
    tok: Tokenizer = LocalTokenizer(tokenizer) if tokenizer else ServerTokenizer(url, model)
    key = (tok.key, tokens, variant, seed)
    with _lock:
        if key in _cache:
            return _cache[key]
    try:
        text = _fit(tok, tokens, variant, seed)
    except TokenizeUnavailable as e:
        with _lock:
            first = tok.key not in _warned
            _warned.add(tok.key)
        if first:
            print(f"kvlab: warning: {e}; prompts are fitted by an approximation (one common word a token), so "
                  "their lengths are near, not exact: pass --tokenizer NAME_OR_PATH (tokenizer= in Python) for "
                  "exact lengths", file=sys.stderr)
        text = approximate_prompt(tokens, variant, seed)
    with _lock:
        _cache[key] = text
    return text


def _fit(tok: Tokenizer, tokens: int, variant: int, seed: int) -> str:
    specials = special_token_count("", "", tok)
    need = tokens - specials
    if need < 1:
        raise ValueError(f"a prompt of {tokens} tokens is too short: the tokenizer adds {specials} special "
                         f"token(s) to every prompt; ask for at least {specials + 1}")
    n_words = need + 8
    while True:
        ids = tok.encode(_words(variant, seed, n_words), special=False)
        if len(ids) >= need + 8:
            break
        n_words *= 2
    # Cutting a token list and detokenizing can merge tokens at the cut; adjust until the count is exact.
    cut = need
    got = 0
    for _ in range(16):
        text = tok.decode(ids[:cut])
        got = len(tok.encode(text, special=True))
        if got == tokens:
            return text
        cut += tokens - got
        if cut < 1 or cut > len(ids):
            break
    raise RuntimeError(f"could not fit a prompt of exactly {tokens} tokens with {tok.key} (last: {got}); "
                       "use a prompts file instead")


@dataclass(frozen=True)
class SyntheticPrompts:
    """Prompts of exactly `tokens` tokens; `distinct` different ones cycled (None: one per request)."""

    tokens: int
    distinct: int | None = None
    workers: int = 8
    tokenizer: str | None = None  # a local tokenizer (name or path); None: the server's /tokenize

    def take(self, count: int, *, url: str, model: str, seed: int = 0) -> list[str]:
        kinds = count if self.distinct is None else min(count, self.distinct)
        fit = lambda v: synthetic_prompt(url, model, self.tokens, v, seed, tokenizer=self.tokenizer)  # noqa: E731
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            texts = list(pool.map(fit, range(kinds)))
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


def read_sharegpt(path: str | Path, limit: int | None = None) -> list[str]:
    """First user turns of a ShareGPT-style JSON file (a list of `{"conversations": [{"from": "human", "value":
    ...}, {"from": "gpt", ...}]}`), as `vllm bench serve --dataset-name sharegpt` takes them: conversations of at
    least two turns, in file order. A file that is not that shape is a ValueError that says what was found."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not a ShareGPT JSON file ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations, got {type(data).__name__}")
    prompts: list[str] = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first = turns[0]
        text = first.get("value") if isinstance(first, dict) else None
        if isinstance(text, str) and text.strip():
            prompts.append(text)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path} holds no conversation with a first turn and a reply "
                         '(expected [{"conversations": [{"from": "human", "value": "..."}, ...]}, ...])')
    return prompts


def prompts_file(path: str | Path) -> PromptList:
    return PromptList(read_prompts_file(path))


PromptsLike = Union[PromptSource, int, Sequence[str], Path]


def as_prompt_source(prompts: PromptsLike, tokenizer: str | None = None) -> PromptSource:
    """An int means synthetic prompts of that many tokens (fitted with `tokenizer`, else the server's /tokenize),
    a Path a prompts file, a str one prompt, a sequence of strings a PromptList."""
    if isinstance(prompts, bool):
        raise TypeError("prompts must be an int, a list of strings, a Path or a PromptSource")
    if isinstance(prompts, int):
        return SyntheticPrompts(prompts, tokenizer=tokenizer)
    if isinstance(prompts, Path):
        return prompts_file(prompts)
    if isinstance(prompts, str):
        return PromptList([prompts])
    if isinstance(prompts, PromptSource):
        return prompts
    return PromptList(list(prompts))
