"""The fleet YAML (the multi-LLM controller's format): engines, their environments, router and sleep settings.

Parsing is strict because a typo in a YAML key otherwise silently falls back to a default (an instance that
"has" kvcached but does not). Every error names the key, where it is, and the fix. The file itself is hostile
input too: it must be UTF-8, its aliases may not expand past MAX_YAML_NODES, and numbers must be finite.

    kvcached:            {kvcached_log_level: INFO}      # env for all instances (KEY -> KVCACHED_KEY)
    router:              {enable_router: true, router_port: 8080, router_host: 127.0.0.1}
    sleep_manager:       {idle_threshold_seconds: 300, check_interval_seconds: 60, auto_sleep_enabled: false,
                          wakeup_on_request: true, min_sleep_duration: 60, sleep_level: kv}
    instances:
      - {name: a, model: Qwen/Qwen2.5-0.5B-Instruct, engine: vllm, port: 12346,
         kvcached_env: ["ENABLE_KVCACHED=true"], engine_env: [...], engine_args: "--max-model-len 2048"}
"""
from __future__ import annotations

import difflib
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kvcached.env import KNOB_NAMES
from kvcached.shm import FALSE_VALUES, TRUE_VALUES
from kvlab.router.settings import DEFAULT_MAX_BODY_BYTES, SLEEP_LEVELS, RouterSettings, SleepSettings

ENGINES = ("vllm", "sglang")

TOP_KEYS = ("kvcached", "router", "sleep_manager", "instances", "launch_delay_seconds")
ROUTER_KEYS = ("enable_router", "router_port", "router_host", "api_token", "max_body_bytes",
               "traffic_window_seconds", "request_timeout_seconds", "connect_timeout_seconds", "read_timeout_seconds",
               "max_concurrent_per_backend")
SLEEP_KEYS = ("idle_threshold_seconds", "check_interval_seconds", "auto_sleep_enabled", "wakeup_on_request",
              "min_sleep_duration", "sleep_level", "drain_timeout_seconds")
INSTANCE_KEYS = ("name", "model", "engine", "port", "host", "using_venv", "venv_path", "kvcached_env",
                 "engine_env", "engine_args", "sleep_level", "prefix_store")
PREFIX_STORE_KEYS = ("store", "max_bytes")

# A fleet file has tens of nodes; this bound lets anchors and aliases be used freely while a few hundred bytes
# of nested aliases ("billion laughs") cannot expand into gigabytes when a value is read.
MAX_YAML_NODES = 100_000
# Far above any fleet file, far below memory trouble: `--config /dev/zero` must not read forever.
MAX_FILE_BYTES = 1 << 20


class FleetConfigError(ValueError):
    """A fleet file that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class EngineConfig:
    name: str
    model: str
    engine: str = "vllm"
    port: int | None = None
    host: str = "127.0.0.1"
    venv_path: str | None = None
    kvcached_env: dict[str, str] = field(default_factory=dict)
    engine_env: dict[str, str] = field(default_factory=dict)
    engine_args: list[str] = field(default_factory=list)
    sleep_level: str | None = None
    prefix_store: str | None = None  # a kvcached prefix store shared with the other engines on it (vLLM only)
    prefix_store_max_bytes: int | None = None

    @property
    def served_model_name(self) -> str:
        """The `model` field requests carry: --served-model-name if given, else the model."""
        value = _arg_value(self.engine_args, "--served-model-name")
        return value if value else self.model

    @property
    def url(self) -> str:
        if self.port is None:
            raise FleetConfigError(f"instance {self.name!r} has no port yet: give `port:` in the fleet file")
        return f"http://{self.host}:{self.port}"

    @property
    def sleep_mode_enabled(self) -> bool:
        """vLLM's own sleep mode (level `engine`) exists only when the engine was started for it."""
        return "--enable-sleep-mode" in self.engine_args


@dataclass(frozen=True)
class FleetConfig:
    instances: list[EngineConfig]
    kvcached: dict[str, str] = field(default_factory=dict)
    router: RouterSettings = field(default_factory=RouterSettings)
    sleep_manager: SleepSettings = field(default_factory=SleepSettings)
    launch_delay_seconds: float = 0.0
    source: Path | None = None

    def environment(self, instance: EngineConfig) -> dict[str, str]:
        """An instance's engine environment: global kvcached env, then its kvcached_env, then its engine_env."""
        return {**self.kvcached, **instance.kvcached_env, **instance.engine_env}

    def uses_kvcached(self, instance: EngineConfig) -> bool:
        return self.environment(instance).get("ENABLE_KVCACHED", "").strip().lower() in TRUE_VALUES

    def instance(self, name_or_model: str) -> EngineConfig:
        for inst in self.instances:
            if name_or_model in (inst.name, inst.served_model_name):
                return inst
        raise KeyError(name_or_model)


# ---- parsing -----------------------------------------------------------------------------------------------

def _where(path: str) -> str:
    return f"`{path}`"


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for key in data:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"allowed keys: {', '.join(allowed)}"
        where = f" in {_where(path)}" if path else ""
        raise FleetConfigError(f"unknown key `{key}`{where}: {hint}")


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FleetConfigError(f"{_where(path)} must be a mapping (key: value lines), got {type(value).__name__}")
    return value


def _bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_VALUES | FALSE_VALUES:
        return value.strip().lower() in TRUE_VALUES
    raise FleetConfigError(f"{_where(path)} must be true or false, got {value!r}")


def _number(value: Any, path: str, *, minimum: float = 0.0) -> float:
    # NaN compares false with everything, so it would pass `value < minimum`; infinity would never time out.
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < minimum):
        raise FleetConfigError(f"{_where(path)} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def _count(value: Any, path: str, *, minimum: int = 1) -> int:
    """A whole number (2.5 requests or bytes is a typo, not something to round)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FleetConfigError(f"{_where(path)} must be a whole, finite number >= {minimum}, got {value!r}")
    return value


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise FleetConfigError(f"{_where(path)} must be a TCP port (1-65535), got {value!r}")
    return value


def _host(value: Any, path: str) -> str:
    """A host name or address; `localhost` (the whole name only) becomes 127.0.0.1, because "localhost" may
    resolve to ::1 first and miss an IPv4 server."""
    if not isinstance(value, str) or not value.strip() or len(value.split()) != 1:
        raise FleetConfigError(f"{_where(path)} must be a host name or address such as 127.0.0.1, got {value!r}")
    value = value.strip()
    return "127.0.0.1" if value.lower().rstrip(".") == "localhost" else value


def _env(value: Any, path: str) -> dict[str, str]:
    """A list of "KEY=VALUE" strings (the controller's form) or a mapping."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        out = {str(k): _env_value(v) for k, v in value.items()}
    elif isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
                raise FleetConfigError(f"{_where(f'{path}[{i}]')} must look like \"KEY=VALUE\", got {item!r}")
            key, val = item.split("=", 1)
            out[key.strip()] = val
    else:
        raise FleetConfigError(f"{_where(path)} must be a list of \"KEY=VALUE\" strings or a mapping")
    for key in out:
        if _looks_like_kvcached(key) and key not in KNOB_NAMES:
            raise FleetConfigError(f"unknown kvcached variable `{key}` in {_where(path)}: "
                                   f"{_knob_hint(key, lower=False)}")
    return out


def _looks_like_kvcached(name: str) -> bool:
    """A name kvcached would read if it were spelt right; other variables of an engine's environment are free."""
    upper = name.upper()
    return ("KVCACHED" in upper
            or bool(difflib.get_close_matches(upper, KNOB_NAMES, n=1, cutoff=0.85)))


def _bare(name: str) -> str:
    """A knob's name as the `kvcached:` section spells it in lower case: without the KVCACHED_ prefix."""
    return name[len("KVCACHED_"):] if name.startswith("KVCACHED_") else name


def _knob_hint(key: str, *, lower: bool) -> str:
    """Did-you-mean for a kvcached variable, in the spelling the file used (`ipc_name` or KVCACHED_IPC_NAME)."""
    bare_names = {_bare(name): name for name in KNOB_NAMES}
    close = difflib.get_close_matches(_bare(key.upper()), bare_names, n=1, cutoff=0.5)
    if close:
        return f"did you mean `{close[0].lower() if lower else bare_names[close[0]]}`?"
    known = ", ".join(sorted(n.lower() if lower else bare_names[n] for n in bare_names))
    return (f"kvcached reads only {known} (see kvcached/env.py); put other variables in an instance's "
            "`engine_env`")


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _args(value: Any, path: str) -> list[str]:
    """A list of arguments, or one string split like a shell would ("--gpu-memory-utilization 0.5")."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list):
        out: list[str] = []
        for item in value:
            # A list item may hold a flag and its value ("--max-model-len 2048"): split those too.
            out += shlex.split(str(item)) if isinstance(item, str) else [str(item)]
        return out
    raise FleetConfigError(f"{_where(path)} must be a list of arguments or one string")


def _arg_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _without_arg(args: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = i + 1 < len(args)
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out


def _sleep_level(value: Any, path: str) -> str | None:
    if value is None:
        return None
    if value not in SLEEP_LEVELS:
        close = difflib.get_close_matches(str(value), SLEEP_LEVELS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise FleetConfigError(f"{_where(path)} must be one of {', '.join(SLEEP_LEVELS)}, got {value!r}{hint}")
    return str(value)


def _kvcached_env(section: Mapping[str, Any]) -> dict[str, str]:
    """`kvcached_log_level: INFO` or `log_level: INFO` -> KVCACHED_LOG_LEVEL=INFO; upper-case keys
    (ENABLE_KVCACHED) pass as they are. A name kvcached does not read is an error: it would otherwise become a
    variable nobody reads while kvcached stays off."""
    out = {}
    for key, value in section.items():
        key = str(key)
        env_key = key.upper()
        if not env_key.startswith("KVCACHED_") and env_key != "ENABLE_KVCACHED":
            env_key = "KVCACHED_" + env_key
        if env_key not in KNOB_NAMES:
            raise FleetConfigError(f"unknown key `{key}` in {_where('kvcached')}: "
                                   f"{_knob_hint(key, lower=not key.isupper())}")
        if isinstance(value, (Mapping, list)):
            raise FleetConfigError(f"{_where(f'kvcached.{key}')} must be one value, got a "
                                   f"{'mapping' if isinstance(value, Mapping) else 'list'}")
        out[env_key] = _env_value(value)
    return out


def _prefix_store(value: Any, path: str) -> tuple[str | None, int | None]:
    """`prefix_store: docs` (a name), `prefix_store: /shared/kv` (a directory), or
    `prefix_store: {store: docs, max_bytes: 2G}` (bytes, or a size with K/M/G/T)."""
    if value is None:
        return None, None
    if isinstance(value, str):
        if not value.strip():
            raise FleetConfigError(f"{_where(path)} is empty: give a store name or a directory")
        return value.strip(), None
    data = _mapping(value, path)
    _check_keys(data, PREFIX_STORE_KEYS, path)
    store = data.get("store")
    if not isinstance(store, str) or not store.strip():
        raise FleetConfigError(f"{_where(path + '.store')} must name a store or a directory")
    cap = data.get("max_bytes")
    if cap is None:
        return store.strip(), None
    from kvcached.units import parse_size

    try:
        return store.strip(), parse_size(cap)
    except ValueError as exc:
        raise FleetConfigError(f"{_where(path + '.max_bytes')}: {exc}") from None


def _parse_instance(raw: Any, i: int, source_dir: Path | None) -> EngineConfig:
    path = f"instances[{i}]"
    data = _mapping(raw, path)
    _check_keys(data, INSTANCE_KEYS, path)
    name = data.get("name")
    if not name or not isinstance(name, str):
        raise FleetConfigError(f"{_where(path + '.name')} is missing: give every instance a unique `name:`")
    path = f"instances[{i}] ({name})"
    model = data.get("model")
    if not model or not isinstance(model, str):
        raise FleetConfigError(f"{_where(path)} has no `model`: add `model: <HF id or local dir>`")
    engine = str(data.get("engine", "vllm"))
    if engine not in ENGINES:
        raise FleetConfigError(f"{_where(path + '.engine')} must be one of {', '.join(ENGINES)}, got {engine!r}")
    args = _args(data.get("engine_args"), path + ".engine_args")
    # The controller's files give the port and host inside engine_args; the router needs them, so lift them out.
    port_arg, host_arg = _arg_value(args, "--port"), _arg_value(args, "--host")
    args = _without_arg(_without_arg(args, "--port"), "--host")
    port = data.get("port")
    if port is None and port_arg is not None:
        if not port_arg.isdigit():
            raise FleetConfigError(f"{_where(path + '.engine_args')}: --port {port_arg!r} is not a number")
        port = int(port_arg)
    if port is not None:
        port = _port(port, path + ".port")
        if port_arg is not None and int(port_arg) != port:
            raise FleetConfigError(f"{_where(path)}: `port: {port}` and `--port {port_arg}` in engine_args disagree; "
                                   "keep one of them")
    host = _host(data.get("host") or host_arg or "127.0.0.1", path + ".host")
    venv = data.get("venv_path")
    if venv is not None:
        venv_path = Path(str(venv)).expanduser()
        if not venv_path.is_absolute() and source_dir is not None:
            venv_path = source_dir / venv_path
        if not (venv_path / "bin" / "python").exists():
            raise FleetConfigError(f"{_where(path + '.venv_path')}: no bin/python under {venv_path}; "
                                   "point it at a virtual environment with the engine installed, or remove it")
        venv = str(venv_path)
    model_path = Path(model).expanduser()
    if not model_path.is_absolute() and source_dir is not None and (source_dir / model_path).is_dir():
        model = str(source_dir / model_path)  # a local model dir relative to the fleet file
    store, store_cap = _prefix_store(data.get("prefix_store"), path + ".prefix_store")
    if store is not None and engine != "vllm":
        raise FleetConfigError(f"{_where(path + '.prefix_store')}: prefix sharing is a vLLM KV connector; "
                               f"engine {engine} cannot use it: remove prefix_store or use engine: vllm")
    return EngineConfig(
        name=name, model=model, engine=engine, port=port, host=host, venv_path=venv,
        kvcached_env=_env(data.get("kvcached_env"), path + ".kvcached_env"),
        engine_env=_env(data.get("engine_env"), path + ".engine_env"),
        engine_args=args, sleep_level=_sleep_level(data.get("sleep_level"), path + ".sleep_level"),
        prefix_store=store, prefix_store_max_bytes=store_cap)


def parse_fleet_config(data: Any, *, source: Path | None = None, check_ports: bool = True) -> FleetConfig:
    """Validate a parsed YAML document; `check_ports` also refuses ports that something already listens on
    (right before launching engines, not when the router joins engines that are already up)."""
    top = _mapping(data, "top level")
    _check_keys(top, TOP_KEYS, "")
    source_dir = source.parent if source else None

    router_raw = _mapping(top.get("router"), "router")
    _check_keys(router_raw, ROUTER_KEYS, "router")
    router = RouterSettings(
        enable_router=_bool(router_raw.get("enable_router", True), "router.enable_router"),
        router_port=_port(router_raw.get("router_port", 8080), "router.router_port"),
        router_host=_host(router_raw.get("router_host", "127.0.0.1"), "router.router_host"),
        api_token=str(router_raw["api_token"]) if router_raw.get("api_token") else None,
        max_body_bytes=_count(router_raw.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES), "router.max_body_bytes"),
        traffic_window_seconds=_number(router_raw.get("traffic_window_seconds", 60.0),
                                       "router.traffic_window_seconds", minimum=0.001),
        request_timeout_seconds=(None if router_raw.get("request_timeout_seconds") is None else
                                 _number(router_raw["request_timeout_seconds"], "router.request_timeout_seconds",
                                         minimum=0.001)),
        connect_timeout_seconds=_number(router_raw.get("connect_timeout_seconds",
                                                       RouterSettings.connect_timeout_seconds),
                                        "router.connect_timeout_seconds", minimum=0.001),
        # An explicit null: no limit between two chunks of an answer.
        read_timeout_seconds=(None if router_raw.get("read_timeout_seconds", RouterSettings.read_timeout_seconds)
                              is None else
                              _number(router_raw.get("read_timeout_seconds", RouterSettings.read_timeout_seconds),
                                      "router.read_timeout_seconds", minimum=0.001)),
        max_concurrent_per_backend=_count(router_raw.get("max_concurrent_per_backend",
                                                         RouterSettings.max_concurrent_per_backend),
                                          "router.max_concurrent_per_backend"))

    sleep_raw = _mapping(top.get("sleep_manager"), "sleep_manager")
    _check_keys(sleep_raw, SLEEP_KEYS, "sleep_manager")
    d = SleepSettings()
    sleep = SleepSettings(
        idle_threshold_seconds=_number(sleep_raw.get("idle_threshold_seconds", d.idle_threshold_seconds),
                                       "sleep_manager.idle_threshold_seconds"),
        check_interval_seconds=_number(sleep_raw.get("check_interval_seconds", d.check_interval_seconds),
                                       "sleep_manager.check_interval_seconds", minimum=0.01),
        auto_sleep_enabled=_bool(sleep_raw.get("auto_sleep_enabled", d.auto_sleep_enabled),
                                 "sleep_manager.auto_sleep_enabled"),
        wakeup_on_request=_bool(sleep_raw.get("wakeup_on_request", d.wakeup_on_request),
                                "sleep_manager.wakeup_on_request"),
        min_sleep_duration=_number(sleep_raw.get("min_sleep_duration", d.min_sleep_duration),
                                   "sleep_manager.min_sleep_duration"),
        sleep_level=_sleep_level(sleep_raw.get("sleep_level"), "sleep_manager.sleep_level"),
        drain_timeout_seconds=_number(sleep_raw.get("drain_timeout_seconds", d.drain_timeout_seconds),
                                      "sleep_manager.drain_timeout_seconds"))

    raw_instances = top.get("instances")
    if not raw_instances or not isinstance(raw_instances, list):
        raise FleetConfigError("`instances` is missing or empty: list at least one instance with `name` and `model`")
    instances = [_parse_instance(raw, i, source_dir) for i, raw in enumerate(raw_instances)]
    _check_unique(instances, router)
    if check_ports:
        _check_ports_free(instances, router)

    kv_raw = _mapping(top.get("kvcached"), "kvcached")
    return FleetConfig(instances=instances, kvcached=_kvcached_env(kv_raw), router=router, sleep_manager=sleep,
                       launch_delay_seconds=_number(top.get("launch_delay_seconds", 0.0), "launch_delay_seconds"),
                       source=source)


def _check_unique(instances: list[EngineConfig], router: RouterSettings) -> None:
    seen_names: dict[str, int] = {}
    seen_models: dict[str, str] = {}
    seen_ports: dict[int, str] = {router.router_port: "router.router_port"} if router.enable_router else {}
    for i, inst in enumerate(instances):
        if inst.name in seen_names:
            raise FleetConfigError(f"duplicate instance name {inst.name!r} (instances[{seen_names[inst.name]}] and "
                                   f"instances[{i}]): give each instance its own `name`")
        seen_names[inst.name] = i
        model = inst.served_model_name
        if model in seen_models:
            raise FleetConfigError(f"instances {seen_models[model]!r} and {inst.name!r} both serve model {model!r}: "
                                   "the router routes by model, so add `--served-model-name <alias>` to one's "
                                   "engine_args")
        seen_models[model] = inst.name
        if inst.port is not None:
            if inst.port in seen_ports:
                raise FleetConfigError(f"duplicate port {inst.port}: instance {inst.name!r} and "
                                       f"{seen_ports[inst.port]} use it; give each a different `port`")
            seen_ports[inst.port] = f"instance {inst.name!r}"


def _check_ports_free(instances: list[EngineConfig], router: RouterSettings) -> None:
    from kvlab.engines.ports import port_in_use

    wanted = [(inst.port, inst.host, f"instance {inst.name!r}") for inst in instances if inst.port is not None]
    if router.enable_router:
        wanted.append((router.router_port, router.router_host, "router.router_port"))
    for port, host, who in wanted:
        bind_host = host if host in ("127.0.0.1", "0.0.0.0", "::") else "0.0.0.0"
        if port_in_use(port, bind_host):
            raise FleetConfigError(f"port {port} ({who}) is already in use: stop what listens there "
                                   f"(`ss -ltnp 'sport = :{port}'`) or choose another port")


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise FleetConfigError(f"fleet file {path} not found: pass --config with an existing file "
                               "(examples/fleet-tiny.yaml is a start)") from None
    except IsADirectoryError:
        raise FleetConfigError(f"{path} is a directory: pass --config the fleet YAML file inside it") from None
    except OSError as e:
        raise FleetConfigError(f"cannot read fleet file {path} ({e.strerror or e}): check its permissions, or "
                               "pass --config a readable file") from None
    if len(raw) > MAX_FILE_BYTES:
        raise FleetConfigError(f"{path} is larger than {MAX_FILE_BYTES // 1024} KiB, which no fleet file is: "
                               "pass --config the fleet YAML file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FleetConfigError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                               "save it as UTF-8") from None


def _children(node: Any) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: Any) -> None:
    """Refuse a node graph that expands past MAX_YAML_NODES (each alias use counts what it repeats in full), or
    that holds itself. Iterative, with sizes memoised per node: the check costs the graph, not its expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the path from the root: an alias to one of them is a cycle
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = min(MAX_YAML_NODES + 1, 1 + sum(sizes[id(c)] for c in _children(node)))
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise FleetConfigError(f"an alias refers to itself (line {node.start_mark.line + 1}): a fleet file "
                                   "is a tree; write the value out")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    if sizes[id(root)] > MAX_YAML_NODES:
        raise FleetConfigError(f"the document expands to more than {MAX_YAML_NODES:,} YAML nodes through nested "
                               "aliases (`*name` repeats all its anchor holds): write the values out, or nest "
                               "fewer aliases")


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, with the expansion of aliases checked on the node graph before any value is built."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_fleet_config(path: str | Path, *, check_ports: bool = True) -> FleetConfig:
    """Read and validate a fleet YAML file."""
    import yaml

    path = Path(path)
    text = _read_text(path)
    try:
        data = _load_yaml(text)
    except FleetConfigError as e:
        raise FleetConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise FleetConfigError(f"{path} is not valid YAML: {e}") from None
    except RecursionError:
        raise FleetConfigError(f"{path} nests too deeply to be a fleet file: flatten it") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as e:
        # The safe constructor raises these for values such as `2020-13-45` or `!!int x`.
        raise FleetConfigError(f"{path} holds a value YAML cannot build ({e}): fix or quote it") from None
    try:
        return parse_fleet_config(data, source=path.resolve(), check_ports=check_ports)
    except FleetConfigError as e:
        raise FleetConfigError(f"{path}: {e}") from None
