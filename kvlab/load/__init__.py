"""Load: open-loop workloads against OpenAI-compatible servers, one record per request.

- `arrivals`: when requests are sent (constant, Poisson, gamma, bursts, ramps, trace replay);
- `prompts`: what they say (synthetic prompts of an exact token count, lists, files);
- `workload`: sending them on an absolute schedule, several targets on one clock;
- `sse`: the streamed answers, parsed incrementally;
- `client`: plain HTTP helpers (readiness, one completion, a batch of prompts);
- `metrics`: TTFT, TPOT, ITL, e2e and goodput from the records, and requests.csv.
"""
