"""Put idle models to sleep for real, and wake them when a request comes.

Three levels, from light to deep:
- `kv`: set the instance's kvcached limit to 0. Its allocator gives back every idle KV page (~1 s later) and
  admits nothing new; the router holds the model's requests meanwhile. Wake restores the limit: milliseconds.
- `engine`: vLLM's sleep mode (POST /sleep?level=1 offloads weights and drops the KV cache; POST /wake_up),
  plus the kvcached limit 0 when the engine runs kvcached. GPU only; the engine must run with
  --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1.
- `stop`: stop the engine's processes, start them again on wake. Frees everything; wake costs a start-up.
  Needs `kvlab serve`, which owns the processes.

Each sleep records what it freed (process-tree PSS/RSS, kvcached reserved bytes, GPU bytes when there is a GPU)
and each wake how long it took; /sleep/status shows both.

Requests go through `admit(model)`: while a model sleeps (or falls asleep), a request either wakes it and
waits (wakeup_on_request) or is refused with 503. A sleep first closes the gate and waits for the model's
requests in flight to finish, so no request is cut off by its engine losing memory under it.

- `levels`: what sleeping means at each level (kv, engine, stop) and the default level of an engine;
- `manager`: the state machine per model (awake, falling asleep, asleep, waking), the request gate, auto-sleep;
- `memory`: what a sleep freed, measured with kvlab's probes and kvcached's records.
"""
from kvlab.router.sleep.levels import (
    EngineLevel,
    KVLevel,
    SleepError,
    SleepLevel,
    StopLevel,
    default_sleep_level,
    make_level,
)
from kvlab.router.sleep.manager import ASLEEP, AWAKE, FALLING_ASLEEP, WAKING, ModelAsleep, SleepManager
from kvlab.router.sleep.memory import measure_memory

__all__ = ["ASLEEP", "AWAKE", "FALLING_ASLEEP", "WAKING", "EngineLevel", "KVLevel", "ModelAsleep", "SleepError",
           "SleepLevel", "SleepManager", "StopLevel", "default_sleep_level", "make_level", "measure_memory"]
