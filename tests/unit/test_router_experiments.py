"""Notebook 03's fleet, as a fleet file would describe it (no engine started here; tests/server runs it)."""
from __future__ import annotations

import pytest

from kvlab.engines.fleet_config import FleetConfigError
from kvlab.experiments.router_fleet import fleet_config


def _config(levels: list[str | None]):  # type: ignore[no-untyped-def]
    return fleet_config(["m/a", "m/b"], ["a", "b"], kv_cache_gib=0.25, group="g1", sleep_levels=levels,
                        idle_threshold_s=3.0, router_port=18080, engine_args=["--seed", "1"])


def test_every_engine_runs_kvcached_in_one_group_and_serves_its_series_name() -> None:
    config = _config(["kv", "stop"])
    assert [i.served_model_name for i in config.instances] == ["a", "b"]
    for inst in config.instances:
        assert config.uses_kvcached(inst)
        assert config.environment(inst)["KVCACHED_IPC_NAME"] == "g1"
        args = inst.engine_args
        assert args[args.index("--kv-cache-memory-bytes") + 1] == str(int(0.25 * (1 << 30)))
        assert args[-2:] == ["--seed", "1"]
    assert [i.sleep_level for i in config.instances] == ["kv", "stop"]
    assert all(i.port is None for i in config.instances)  # kvlab.engines.fleet picks free ports at start
    # The notebook decides when a model sleeps; the threshold only makes candidates.
    assert config.sleep_manager.auto_sleep_enabled is False
    assert config.sleep_manager.idle_threshold_seconds == 3.0 and config.sleep_manager.min_sleep_duration == 0
    assert config.router.router_port == 18080


def test_engine_level_turns_on_vllm_sleep_mode() -> None:
    config = _config(["engine", None])
    eng, default = config.instances
    assert "--enable-sleep-mode" in eng.engine_args and config.environment(eng)["VLLM_SERVER_DEV_MODE"] == "1"
    assert "--enable-sleep-mode" not in default.engine_args and default.sleep_level is None


def test_unknown_level_is_refused_with_the_choices() -> None:
    with pytest.raises(FleetConfigError, match="kv"):
        _config(["deep", "kv"])
