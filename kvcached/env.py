"""Every environment variable kvcached reads, in one table: its meaning and its default.

Tools that write engine environments (kvlab's fleet files, launch scripts) check names against this table, so a
typo such as `KVCACHED_IPC_NAM` is an error with a suggestion instead of a variable nobody reads.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    name: str
    meaning: str
    default: str = ""


KNOBS: tuple[Knob, ...] = (
    Knob("ENABLE_KVCACHED", "switch kvcached on inside vLLM (`true` or `1`)", "false"),
    Knob("KVCACHED_AUTOPATCH", "accepted for compatibility with older launch scripts; ENABLE_KVCACHED decides", ""),
    Knob("KVCACHED_IPC_NAME", "the budget group: engines with the same name share one budget", "one per engine"),
    Knob("KVCACHED_SHM_DIR", "where budget records, group caps and pool files live", "/dev/shm/kvcached"),
    Knob("KVCACHED_INSTANCE_NAME", "readable prefix of the engine's kvcached name (`kvctl list`)", "vllm-<pid>"),
    Knob("KVCACHED_INSTANCE", "the engine's exact kvcached name; set by the first vLLM process, inherited after",
         "<prefix>-<random>"),
    Knob("KVCACHED_PAGE_SIZE", "bytes per physical page (a multiple of the CUDA granularity on GPUs)", "2097152"),
    Knob("KVCACHED_RECLAIM_DELAY_S", "seconds an idle page stays mapped before it is given back", "1.0"),
    Knob("KVCACHED_RESERVE_PAGES", "the least logical pages kept mapped ahead while an engine is busy (the warm "
         "reserve follows the last second's demand above it)", "2"),
    Knob("KVCACHED_MAX_RESERVE", "the most memory the warm reserve maps ahead (also at most a sixteenth of the "
         "limit or the group's cap)", "512M"),
    Knob("KVCACHED_MAX_CACHED_TOKENS", "tokens of free prefix cache an engine keeps while nobody needs the memory "
         "(0: none)", "16000"),
    Knob("KVCACHED_PREFIX_RETENTION_S", "optional clock: also drop a free prefix-cache block after this many idle "
         "seconds", "unset (no clock)"),
    Knob("KVCACHED_MIN_FREE_MEMORY", "below this much free host (or device) memory, retained prefix cache is given "
         "back", "512M"),
    Knob("KVCACHED_TRY_VLLM", "1: patch a vLLM release the version table has read but not run (to gather the "
         "evidence that moves it into the supported range)", ""),
    Knob("KVCACHED_LOG_LEVEL", "log level of the `kvcached` logger inside engines (DEBUG, INFO, WARNING...)", "INFO"),
    Knob("KVCACHED_SANITY_CHECK", "accepted for compatibility with upstream kvcached fleet files; no effect here", ""),
)

KNOB_NAMES: frozenset[str] = frozenset(k.name for k in KNOBS)
