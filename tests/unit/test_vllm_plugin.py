"""The plugin entry point: off unless asked, idempotent, and hands-off on an unsupported vLLM."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

from kvcached.integration import import_hooks
from kvcached.integration.vllm import engine_env as config


def test_entry_points_are_registered():
    general = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    endpoint = {ep.name: ep.value for ep in entry_points(group="vllm.endpoint_plugins")}
    assert general["kvcached"] == "kvcached.integration.vllm.plugin:register"
    assert endpoint["kvcached_stats"] == "kvcached.integration.vllm.stats_endpoint:make_plugin"


@pytest.mark.parametrize("value,enabled", [("true", True), ("1", True), ("TRUE", True), ("false", False),
                                           ("0", False), ("", False)])
def test_enable_flag(monkeypatch, value, enabled):
    monkeypatch.setenv("ENABLE_KVCACHED", value)
    assert config.kvcached_enabled() is enabled


def test_autopatch_alone_does_not_enable(monkeypatch):
    monkeypatch.delenv("ENABLE_KVCACHED", raising=False)
    monkeypatch.setenv("KVCACHED_AUTOPATCH", "1")
    assert config.kvcached_enabled() is False


def _run_register(env_lines: str, body: str) -> str:
    """Run register() in a fresh interpreter (patches are process-wide) and return what it printed."""
    code = textwrap.dedent(f"""
        import logging, os, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
        {env_lines}
        from kvcached.integration import import_hooks
        from kvcached.integration.vllm import plugin as vllm_plugin
        {body}
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_disabled_plugin_changes_nothing():
    out = _run_register("os.environ['ENABLE_KVCACHED'] = 'false'", """
        vllm_plugin.register()
        print("pending", sorted(import_hooks._pending))
        import vllm.v1.core.block_pool as bp
        print("patched", bp.BlockPool.__dict__.get("_kvcached_patched", False))
    """)
    assert "pending []" in out and "patched False" in out


def test_register_is_idempotent_and_patches_on_import():
    out = _run_register("os.environ['ENABLE_KVCACHED'] = 'true'", """
        vllm_plugin.register(); vllm_plugin.register()
        print("pending", len(import_hooks._pending["vllm.v1.core.block_pool"]))
        import vllm.v1.core.block_pool as bp
        print("patched", bp.BlockPool.__dict__.get("_kvcached_patched", False))
        print("instance", bool(os.environ.get("KVCACHED_INSTANCE")), "group", bool(os.environ.get("KVCACHED_IPC_NAME")))
    """)
    assert "pending 1" in out
    assert "patched True" in out
    assert "instance True group True" in out


def test_unsupported_vllm_version_warns_once_and_leaves_vllm_alone():
    out = _run_register("os.environ['ENABLE_KVCACHED'] = '1'", """
        import vllm
        vllm.__version__ = "0.99.1"
        vllm_plugin.register(); vllm_plugin.register()
        print("pending", sorted(import_hooks._pending))
    """)
    assert out.count("not a supported version") == 1
    assert "pending []" in out


def test_a_release_that_was_only_read_runs_when_asked_with_its_own_generation_of_hooks():
    """0.25 is read, not run: left alone by default, the flag in the warning named; with KVCACHED_TRY_VLLM=1 it is
    patched, with the per-layer allocation hooks of its generation, not 0.30+'s."""
    out = _run_register("os.environ['ENABLE_KVCACHED'] = '1'", """
        import vllm
        vllm.__version__ = "0.25.1"
        vllm_plugin.register()
        print("pending", sorted(import_hooks._pending))
    """)
    assert "KVCACHED_TRY_VLLM=1 tries it" in out and "pending []" in out
    out = _run_register("os.environ['ENABLE_KVCACHED'] = '1'; os.environ['KVCACHED_TRY_VLLM'] = '1'", """
        import vllm
        vllm.__version__ = "0.25.1"
        vllm_plugin.register()
        print("pending", sorted(import_hooks._pending))
    """)
    assert "trying it because KVCACHED_TRY_VLLM is set" in out
    assert "'vllm.v1.worker.gpu.attn_utils'" in out and "'vllm.v1.worker.utils'" not in out


def test_a_release_supported_on_static_checks_says_so_at_start():
    out = _run_register("os.environ['ENABLE_KVCACHED'] = '1'", """
        import vllm
        vllm.__version__ = "0.34.0"
        vllm_plugin.register()
    """)
    assert "supported on its source checked statically" in out
    assert "elastic KV cache enabled" in out, "a supported release is patched"


def test_each_server_gets_its_own_group_by_default(monkeypatch):
    for name in ("KVCACHED_INSTANCE", "KVCACHED_IPC_NAME", "KVCACHED_INSTANCE_NAME"):
        monkeypatch.delenv(name, raising=False)
    config.settle_engine_env()
    import os

    first = os.environ["KVCACHED_IPC_NAME"]
    assert first == os.environ["KVCACHED_INSTANCE"]
    monkeypatch.delenv("KVCACHED_INSTANCE")
    monkeypatch.delenv("KVCACHED_IPC_NAME")
    config.settle_engine_env()
    assert os.environ["KVCACHED_IPC_NAME"] != first


def test_import_hook_runs_after_module_executes(tmp_path, monkeypatch):
    (tmp_path / "kvc_hook_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    import_hooks.when_imported("kvc_hook_probe", lambda m: seen.append(m.VALUE))
    import kvc_hook_probe  # noqa: F401

    assert seen == [1]
    import_hooks.when_imported("kvc_hook_probe", lambda m: seen.append(m.VALUE + 1))  # already imported: at once
    assert seen == [1, 2]
