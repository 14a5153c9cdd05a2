"""Engines: vLLM (or SGLang) servers as Python objects that cannot leak processes.

- `launcher`: runs a command so that it dies with the process that launched it (`python -m kvlab.engines.launcher`);
- `server`: VLLMServer (start, readiness, logs, requests, stop), free ports;
- `errors`: ServerError and the diagnosis of a failed start from the server's log;
- `colocation`: several servers in one kvcached budget group;
- `fleet_config`: the fleet YAML (`kvlab serve`, `kvlab router`), parsed and validated;
- `fleet`: a fleet's engines under supervision, and the router's view of them.

A new engine is a VLLMServer subclass with its own `command()` (see `fleet.SGLangServer`).
"""
