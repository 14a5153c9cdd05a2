"""kvcached inside vLLM, switched on with ENABLE_KVCACHED=true through vLLM's plugin entry point.

- `plugin`: the entry point vLLM calls in every process; installs the patches when enabled and supported;
- `engine_env`: the engine's name, budget group and page size, from the environment;
- `patches`: the hook targets and the patches applied when vLLM imports their modules;
- `layout`: vLLM's KV cache placement as a kvcached layout (the same plan in scheduler and worker);
- `block_pool`: the scheduler side (which blocks are handed out, pages mapped on demand, reclaim);
- `worker`: the worker side (the KV buffer as a kvcached region, its view kept current);
- `stats_endpoint`: `GET /kvcached/stats` on the API server.
"""
