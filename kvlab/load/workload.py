"""Open-loop workloads against OpenAI-compatible servers, with one record per request.

Open loop on an absolute schedule: request i of a target is sent at t0 + offset_i whatever happened to the
requests before it, so a slow server meets the traffic it was promised and latency shows queueing instead
of the client backing off (a closed loop would hide exactly the bursts that grow the KV cache). Several
targets share one t0, so co-located models see traffic on one time axis, the axis the memory sampler uses
(`kvlab.clock`, monotonic seconds).

Token counts come from the server's `usage`, never from re-tokenizing text on the client.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from kvlab.clock import epoch_at, now
from kvlab.load.arrivals import ArrivalSpec, TraceRow, from_spec
from kvlab.load.client import root_url
from kvlab.load.prompts import PromptsLike, as_prompt_source, synthetic_prompt
from kvlab.load.records import RecordList, RequestRecord
from kvlab.load.sse import SSEParser

# A finite schedule is expected; this many requests in one target means an unbounded generator was
# given with no duration.
MAX_REQUESTS_PER_TARGET = 5_000_000


@dataclass
class Target:
    """One server and the traffic it gets.

    `arrival`: an ArrivalSpec or any iterable of offsets (seconds). `prompts`: an int (synthetic prompts of
    that many tokens, fitted with the server's /tokenize, or with the local `tokenizer` when one is named; with
    neither, approximated), a list of strings, a Path to a prompts file, or a PromptSource. `concurrency` caps
    this target's requests in flight (a wait for a slot delays the send; the schedule stays in `scheduled_s`).
    `endpoint`: "completions" or "chat".
    """

    url: str
    model: str
    arrival: ArrivalSpec | Iterable[float]
    prompts: PromptsLike = 128
    max_tokens: int = 128
    stream: bool = True
    ignore_eos: bool = True
    series: str | None = None
    concurrency: int | None = None
    endpoint: str = "completions"
    temperature: float = 0.0
    extra_body: dict[str, Any] | None = None
    tokenizer: str | None = None  # fits synthetic prompts when the server has no /tokenize (name or path)

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    @property
    def name(self) -> str:
        return self.series or self.model


@dataclass
class _Planned:
    offset: float
    target_index: int
    index: int
    prompt: str
    max_tokens: int


def _offsets(target: Target, index: int, duration_s: float | None, seed: int) -> tuple[list[float],
                                                                                     list[TraceRow] | None]:
    rows = None
    if isinstance(target.arrival, ArrivalSpec):
        spec = target.arrival
        if duration_s is None and spec.kind in ("constant", "poisson", "gamma", "ramp") or (
                duration_s is None and spec.kind == "bursts" and spec.burst_count is None):
            raise ValueError(f"arrival {spec.kind!r} never ends: give the workload a duration")
        rows = spec.trace_rows()
        gen: Iterable[float] = from_spec(spec, seed=seed + index, duration=duration_s)
    else:
        gen = target.arrival
    offsets: list[float] = []
    for off in gen:
        if duration_s is not None and off >= duration_s:
            break
        if off < 0 or math.isnan(off):
            raise ValueError(f"arrival offsets must be >= 0, got {off}")
        offsets.append(float(off))
        if len(offsets) > MAX_REQUESTS_PER_TARGET:
            raise ValueError(f"more than {MAX_REQUESTS_PER_TARGET} requests for {target.name}: give the "
                             "workload a duration or a finite arrival process")
    return offsets, rows


def plan_workload(targets: Sequence[Target], duration_s: float | None, *, seed: int = 0) -> list[_Planned]:
    """Every request of every target with its offset and prompt, merged in send order. Prompts are
    fitted here, before t0, so tokenization never delays a send."""
    plan: list[list[_Planned]] = []
    for ti, target in enumerate(targets):
        offsets, rows = _offsets(target, ti, duration_s, seed)
        n = len(offsets)
        prompts: list[str | None] = [None] * n
        max_tokens = [target.max_tokens] * n
        if rows is not None:
            for i, row in enumerate(rows[:n]):
                if row.output_tokens is not None:
                    max_tokens[i] = max(1, row.output_tokens)
                if row.prompt is not None:
                    prompts[i] = row.prompt
                elif row.prompt_tokens is not None:
                    prompts[i] = synthetic_prompt(target.url, target.model, row.prompt_tokens, i, seed + ti,
                                                  tokenizer=target.tokenizer)
        missing = [i for i, p in enumerate(prompts) if p is None]
        if missing:
            source = as_prompt_source(target.prompts, target.tokenizer)
            fill = source.take(len(missing), url=target.url, model=target.model, seed=seed + ti)
            for i, p in zip(missing, fill):
                prompts[i] = p
        plan.append([_Planned(off, ti, i, prompts[i], max_tokens[i])  # type: ignore[arg-type]
                     for i, off in enumerate(offsets)])
    # Stable merge: equal offsets keep target order, then request order.
    return list(heapq.merge(*plan, key=lambda p: (p.offset, p.target_index, p.index)))


def _payload(target: Target, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": target.model, "max_tokens": max_tokens, "stream": target.stream,
                            "temperature": target.temperature}
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if target.ignore_eos:
        body["ignore_eos"] = True  # vLLM extension: generate exactly max_tokens
    if target.stream:
        body["stream_options"] = {"include_usage": True}
    if target.extra_body:
        body.update(target.extra_body)
    return body


def _take_usage(rec: RequestRecord, data: dict) -> None:
    usage = data.get("usage")
    if usage:
        if usage.get("prompt_tokens") is not None:
            rec.prompt_tokens = int(usage["prompt_tokens"])
        if usage.get("completion_tokens") is not None:
            rec.output_tokens = int(usage["completion_tokens"])


def _choice_text(choice: Any) -> str:
    """A chunk's text: `text` for completions, `delta.content` (or `message.content`) for chat."""
    if not isinstance(choice, dict):
        return ""
    if isinstance(choice.get("text"), str):
        return choice["text"]
    for key in ("delta", "message"):
        part = choice.get(key)
        if isinstance(part, dict) and isinstance(part.get("content"), str):
            return part["content"]
    return ""


async def _read_stream(resp: Any, rec: RequestRecord) -> None:
    parser = SSEParser(comments=False)
    done = False

    def handle(events: list, t: float) -> None:
        nonlocal done
        for ev in events:
            if ev.is_done:
                done = True
                continue
            data = ev.json()
            if not isinstance(data, dict):
                continue
            if data.get("error"):
                # vLLM reports errors that happen mid-stream as a data event.
                err = data["error"]
                rec.status = "error"
                rec.error = (err.get("message") if isinstance(err, dict) else None) or json.dumps(err)[:500]
            if data.get("choices"):
                # Any chunk with choices counts as a token chunk (vLLM's benchmark does the same; text may
                # be empty for special tokens).
                if rec.first_token_s is None:
                    rec.first_token_s = t
                rec.chunk_times.append(t)
                rec.text += _choice_text(data["choices"][0])
            _take_usage(rec, data)

    async for chunk in resp.content.iter_any():
        handle(parser.feed(chunk), now())
    handle(parser.close(), now())
    rec.end_s = now()
    if rec.status == "ok":
        if not rec.chunk_times:
            rec.status, rec.error = "error", "stream ended with no token chunk"
        elif not done:
            rec.status, rec.error = "error", "stream ended without [DONE] (connection cut?)"


async def _send(session: Any, target: Target, item: _Planned, rec: RequestRecord,
                slots: Sequence[asyncio.Semaphore], timeout_s: float) -> None:
    import aiohttp

    path = "/v1/chat/completions" if target.endpoint == "chat" else "/v1/completions"
    url = root_url(target.url) + path
    body = _payload(target, item.prompt, item.max_tokens)
    async with contextlib.AsyncExitStack() as stack:
        for slot in slots:
            await stack.enter_async_context(slot)

        async def exchange() -> None:
            rec.send_s = now()
            async with session.post(url, json=body, headers={"X-Request-Id": rec.request_id}) as resp:
                rec.http_status = resp.status
                if resp.status != 200:
                    text = await resp.text()
                    rec.end_s = now()
                    rec.status, rec.error = "error", f"HTTP {resp.status}: {text[:500]}"
                elif target.stream:
                    await _read_stream(resp, rec)
                else:
                    data = await resp.json(content_type=None)
                    rec.end_s = now()
                    _take_usage(rec, data)
                    if isinstance(data, dict) and data.get("choices"):
                        rec.text = _choice_text(data["choices"][0])

        try:
            await asyncio.wait_for(exchange(), timeout_s)
        except asyncio.TimeoutError:
            rec.end_s = now()
            rec.status, rec.error = "timeout", f"no complete response within {timeout_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as e:
            rec.end_s = now()
            rec.status, rec.error = "error", f"{type(e).__name__}: {e}"[:500]


# Event-loop timers are only as precise as the loop's clock: asyncio's epoll waits whole milliseconds
# (late by up to 1 ms), uvloop's libuv timers tick in milliseconds (early by up to 1 ms). Sleeping again
# for what is left makes a send never early. Spinning out the last millisecond would cut lateness on an
# idle machine, but on a shared one (measured here: 2 busy cores) the burnt CPU got the client preempted
# and made p99 send errors worse, so the loop only sleeps.
async def _sleep_until(when: float) -> None:
    while True:
        delay = when - now()
        if delay <= 0:
            return
        await asyncio.sleep(delay)


async def arun_workload(targets: Sequence[Target], duration_s: float | None, *, seed: int = 0,
                        concurrency: int | None = None, on_record: Callable[[RequestRecord], None] | None = None,
                        progress: bool = True, request_timeout_s: float = 600.0, start_at: float | None = None,
                        lead_s: float = 0.1) -> RecordList:
    """Async form of `run_workload` (for code already inside an event loop)."""
    check_workload_args(duration_s, concurrency, request_timeout_s)
    plan = await asyncio.get_running_loop().run_in_executor(
        None, lambda: plan_workload(targets, duration_s, seed=seed))
    return await _drive(targets, plan, duration_s, concurrency=concurrency, on_record=on_record,
                        progress=progress, request_timeout_s=request_timeout_s, start_at=start_at, lead_s=lead_s)


async def _drive(targets: Sequence[Target], plan: list[_Planned], duration_s: float | None, *,
                 concurrency: int | None, on_record: Callable[[RequestRecord], None] | None, progress: bool,
                 request_timeout_s: float, start_at: float | None, lead_s: float) -> RecordList:
    import aiohttp
    from tqdm.auto import tqdm

    global_slot = [asyncio.Semaphore(concurrency)] if concurrency else []
    target_slots = [[asyncio.Semaphore(t.concurrency)] if t.concurrency else [] for t in targets]
    records = RecordList()
    bar = tqdm(total=len(plan), desc="requests", unit="req", disable=not progress, leave=False)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
    # Only requests still in flight: finished ones drop out, so the final gather is over a handful of tasks.
    # Gathering all of them (thousands at high rates) blocked the loop long enough to send the last one ~20 ms late.
    tasks: set[asyncio.Task] = set()
    failures: list[BaseException] = []  # a bug in a request task (or in on_record) is raised, not lost

    def finished(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                     read_bufsize=1 << 20, trust_env=False) as session:
        t0 = start_at if start_at is not None else now() + lead_s
        records.t0_s, records.t0_epoch_s, records.duration_s = t0, epoch_at(t0), duration_s

        async def one(item: _Planned) -> None:
            target = targets[item.target_index]
            rec = RequestRecord(series=target.name, model=target.model, url=root_url(target.url),
                                request_id=f"{target.name}-{item.index}", scheduled_s=t0 + item.offset)
            await _send(session, target, item, rec, target_slots[item.target_index] + global_slot,
                        request_timeout_s)
            records.append(rec)
            bar.update(1)
            if on_record is not None:
                on_record(rec)

        try:
            for item in plan:
                await _sleep_until(t0 + item.offset)
                task = asyncio.create_task(one(item))
                tasks.add(task)
                task.add_done_callback(finished)
            if tasks:
                await asyncio.gather(*tasks)
            if failures:
                raise failures[0]
        finally:
            for task in list(tasks):
                task.cancel()
            bar.close()
    return records


def _run_loop(coro: Any) -> Any:
    """asyncio.run, on uvloop when installed: it halves the client's CPU per request, which at high rates
    is what keeps sends on schedule."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def check_workload_args(duration_s: float | None, concurrency: int | None, request_timeout_s: float) -> None:
    """ValueError naming the argument for a duration, cap or timeout that would make a run loop forever, send
    nothing, or wait without end."""
    if duration_s is not None and (isinstance(duration_s, bool) or not isinstance(duration_s, (int, float))
                                   or not math.isfinite(duration_s) or duration_s <= 0):
        raise ValueError(f"duration_s must be a number of seconds > 0 (or None), got {duration_s!r}")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise ValueError(f"concurrency must be a whole number >= 1 (or None for no cap), got {concurrency!r}")
    if (isinstance(request_timeout_s, bool) or not isinstance(request_timeout_s, (int, float))
            or not math.isfinite(request_timeout_s) or request_timeout_s <= 0):
        raise ValueError(f"request_timeout_s must be a number of seconds > 0, got {request_timeout_s!r}")


def run_workload(targets: Target | Sequence[Target], duration_s: float | None, *, seed: int = 0,
                 concurrency: int | None = None, on_record: Callable[[RequestRecord], None] | None = None,
                 progress: bool = True, request_timeout_s: float = 600.0, start_at: float | None = None,
                 lead_s: float = 0.1) -> RecordList:
    """Send every target its traffic for `duration_s` seconds (None: until finite arrivals run out), wait
    for the requests in flight, and return one RequestRecord per request in completion order.

    `concurrency` caps requests in flight over all targets; `on_record` is called for each finished record
    (from the event loop, so keep it quick: append a CSV row). `start_at`: the monotonic t0 (default: now
    plus `lead_s`, once prompts are ready). Works inside a running event loop (Jupyter) by driving the
    workload on a private thread.
    """
    check_workload_args(duration_s, concurrency, request_timeout_s)
    if isinstance(targets, Target):
        targets = [targets]
    if not targets:
        raise ValueError("run_workload needs at least one Target")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"targets need distinct series names, got {names}: set Target.series")
    plan = plan_workload(targets, duration_s, seed=seed)
    coro_args = dict(concurrency=concurrency, on_record=on_record, progress=progress,
                     request_timeout_s=request_timeout_s, start_at=start_at, lead_s=lead_s)

    def go() -> RecordList:
        return _run_loop(_drive(targets, plan, duration_s, **coro_args))  # type: ignore[arg-type]

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return go()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(go).result()


__all__ = ["Target", "run_workload", "arun_workload", "plan_workload"]
