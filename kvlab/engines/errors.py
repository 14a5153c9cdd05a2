"""Why a vLLM server failed, read from its log, with the fix for each cause we know.

`diagnose` is a pure function over log text so that it can be tested on real log snippets without
starting a server.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LOG_TAIL_LINES = 50


@dataclass(frozen=True)
class Diagnosis:
    """A known failure: a short cause and what to do about it."""

    cause: str
    fix: str


# Ordered: the first matching rule wins, so specific causes come before generic ones (an argparse error
# mentioning a port must read as a bad argument, not as "port in use").
_RULES: list[tuple[re.Pattern[str], Diagnosis]] = [
    (re.compile(r"No module named '?vllm'?"),
     Diagnosis("vLLM is not installed in this Python",
               "vLLM not found: run `make setup` or activate .venv (or pass python=... to VLLMServer)")),
    (re.compile(r"unrecognized arguments:|error: argument |error: the following arguments are required"
                r"|error: unrecognized|invalid choice:"),
     Diagnosis("bad command-line argument for the vLLM server",
               "fix the server arguments named in the log (see `python -m vllm.entrypoints.openai.api_server "
               "--help`)")),
    (re.compile(r"Address already in use|address already in use|\[Errno 98\]"),
     Diagnosis("port already in use",
               "choose another port, or leave port=None to pick a free one; `ss -ltnp` shows who holds it")),
    (re.compile(r"out of memory|OutOfMemoryError|Cannot allocate memory|MemoryError|"
                r"insufficient (?:memory|KV cache)|less than requested memory for kv|"
                r"[Nn]o available memory for the cache blocks|"
                r"larger than the available|exceeds the available|not enough (?:memory|KV cache)|"
                r"Killed\s*$|is larger than the maximum number of tokens that can be stored in KV cache",
                re.MULTILINE),
     Diagnosis("out of memory (the KV cache is too big for this machine)",
               "lower the KV cache: kv_cache_gib=... (VLLM_CPU_KVCACHE_SPACE) on CPU, "
               "--gpu-memory-utilization on GPU, or lower --max-model-len")),
    (re.compile(r"Repo id must be|is not a local folder and is not a valid model identifier|"
                r"RepositoryNotFoundError|LocalEntryNotFoundError|OfflineModeIsEnabled|"
                r"Can't load the configuration of|Invalid repository ID or local directory|"
                r"No such file or directory: .*config\.json|does not appear to have a file named config\.json"),
     Diagnosis("model not found",
               "check the model path or name; offline, generate the tiny model with "
               "`kvlab tiny-model .cache/models/tiny-llama` (HF_HUB_OFFLINE=1 forbids downloads)")),
    # After the specific causes: an engine death whose root cause is not in the log (killed from outside,
    # typically by the kernel's OOM killer).
    (re.compile(r"EngineDeadError|EngineCore encountered an issue|died unexpectedly"),
     Diagnosis("the engine process (EngineCore or a worker) died",
               "look above in the log for its root cause; if none, it was killed from outside (`dmesg` shows "
               "the OOM killer): lower kv_cache_gib or run fewer servers")),
    # Last: vLLM only warns when a plugin fails, so this explains a death only when nothing else does.
    (re.compile(r"Failed to load plugin kvcached"),
     Diagnosis("the kvcached vLLM plugin failed to import",
               "reinstall the project (`.venv/bin/pip install -e .`) and check the traceback above it in the log")),
]


def diagnose(log_text: str) -> Diagnosis | None:
    """The first known cause found in `log_text`, or None when the log matches none of them."""
    for pattern, diagnosis in _RULES:
        if pattern.search(log_text):
            return diagnosis
    return None


def log_tail(log_text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(log_text.splitlines()[-lines:])


class ServerError(RuntimeError):
    """A vLLM server failed to start or died; the message holds the cause, the fix and the log tail."""

    def __init__(self, summary: str, *, log_text: str = "", log_path: Path | str | None = None,
                 returncode: int | None = None, diagnosis: Diagnosis | None = None) -> None:
        self.summary = summary
        self.diagnosis = diagnosis or (diagnose(log_text) if log_text else None)
        self.log_path = Path(log_path) if log_path else None
        self.returncode = returncode
        self.tail = log_tail(log_text)
        parts = [summary]
        if returncode is not None:
            parts[0] += f" (exit code {returncode})"
        if self.diagnosis:
            parts.append(f"cause: {self.diagnosis.cause}")
            parts.append(f"fix: {self.diagnosis.fix}")
        if self.log_path:
            parts.append(f"log: {self.log_path}")
        if self.tail:
            parts.append(f"last {LOG_TAIL_LINES} log lines:\n{self.tail}")
        super().__init__("\n".join(parts))

    @property
    def cause(self) -> str | None:
        return self.diagnosis.cause if self.diagnosis else None
