"""kvcached's vLLM version table, checked: every release in it has every hook target where the table says.

The installed vLLM (the newest supported) is checked against its real classes in test_vllm_integration.py. Here the
other rows are checked statically, by parsing the source of each release's wheel (unpacked by `make setup` into
.cache/vllm-src/<version>; a wheel cannot be installed beside another vLLM, and 0.33's is GPU-only): the module,
the class and method or function, and the leading parameter names. A target a module only imports by name (vLLM's
model runner takes `allocate_kv_cache` from worker.utils) or that a class inherits counts where it is defined.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvcached.integration.vllm import versions

REPO = Path(__file__).resolve().parents[2]
SOURCES = REPO / ".cache" / "vllm-src"


def _definition(root: Path, module: str, attr: str, seen: frozenset[str] = frozenset()) -> ast.AST | None:
    """The class or function `attr` ("Class.method" or "function") of `module` in the source tree at `root`,
    following `from X import name` and base classes defined in vLLM."""
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists() or (module, attr) in seen:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    seen = seen | {(module, attr)}
    head, _, rest = attr.partition(".")
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == head:
            if not rest:
                return node
            for item in getattr(node, "body", []):
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == rest:
                    return item
            for base in getattr(node, "bases", []):  # an inherited method: look in vLLM base classes
                name = base.id if isinstance(base, ast.Name) else None
                origin = _imported_from(tree, name, module) if name else None
                found = _definition(root, origin or module, f"{name}.{rest}", seen) if name else None
                if found is not None:
                    return found
            return None
    origin = _imported_from(tree, head, module)
    return _definition(root, origin, attr, seen) if origin else None


def _imported_from(tree: ast.Module, name: str, module: str) -> str | None:
    """The vLLM module `name` is imported from in `module` (relative imports resolved), or None."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not any((a.asname or a.name) == name for a in node.names):
            continue
        if node.level:  # `from .utils import x` inside vllm.v1.worker.gpu_model_runner
            package = module.rsplit(".", node.level)[0]
            return f"{package}.{node.module}" if node.module else package
        if node.module and node.module.startswith("vllm"):
            return node.module
    return None


def _params(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ClassDef):
        return []
    args = node.args  # type: ignore[attr-defined]
    return [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]


ROWS = [row for row in versions.VERSIONS if (SOURCES / row.checked.split()[1]).is_dir()]


def test_the_unpacked_sources_are_there():
    """`make setup` unpacks every row's wheel; a row without its source would be checked by nothing."""
    missing = [row.checked for row in versions.VERSIONS if row not in ROWS]
    assert not missing, f"no unpacked source for {missing} in {SOURCES}: run `make setup`"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.series)
def test_every_hook_target_is_where_the_table_says(row):
    root = SOURCES / row.checked.split()[1]
    problems = []
    for module, attr, params in versions.hook_targets(row.series):
        node = _definition(root, module, attr)
        if node is None:
            problems.append(f"{module}:{attr} is not there")
        elif _params(node)[:len(params)] != list(params):
            problems.append(f"{module}:{attr} takes {_params(node)[:len(params) + 2]}, not {list(params)}")
    assert not problems, f"vLLM {row.checked}: " + "; ".join(problems)


def _has_member(root: Path, module: str, attr: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether class `attr` ("Class.name") of `module` defines `name`: a method or property, a class-level or
    dataclass field, or an attribute one of its methods sets on self; in the class or a vLLM base class."""
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists() or (module, attr) in seen:
        return False
    seen = seen | {(module, attr)}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls_name, _, name = attr.partition(".")
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name == cls_name):
            continue
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name:
                return True
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.target.id == name:
                return True
            if isinstance(item, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in item.targets):
                return True
        for sub in ast.walk(node):
            targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target] if isinstance(sub, ast.AnnAssign) \
                else []
            if any(isinstance(t, ast.Attribute) and t.attr == name and isinstance(t.value, ast.Name)
                   and t.value.id == "self" for t in targets):
                return True
        for base in node.bases:
            base_name = base.id if isinstance(base, ast.Name) else None
            origin = _imported_from(tree, base_name, module) if base_name else None
            if base_name and _has_member(root, origin or module, f"{base_name}.{name}", seen):
                return True
        return False
    origin = _imported_from(tree, cls_name, module)
    return _has_member(root, origin, attr, seen) if origin else False


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.series)
def test_every_other_name_kvcached_reads_is_there(row):
    root = SOURCES / row.checked.split()[1]
    missing = [f"{module}:{attr}" for module, attr in versions.relied_on(row.series)
               if not _has_member(root, module, attr)]
    assert not missing, f"vLLM {row.checked}: not there: " + "; ".join(missing)


def test_releases_that_ran_or_were_checked_are_supported_and_the_range_is_named():
    assert versions.SUPPORTED_SERIES == ("0.26", "0.30", "0.31", "0.32", "0.33", "0.34")
    assert versions.is_supported("0.31.0") and versions.is_supported("0.32.1.dev3+cpu")
    assert versions.is_supported("0.26.0"), "ran on an H200 (docs/gpu.md)"
    assert versions.row_for("0.34.0").evidence == "checked", "no CPU build, torch 2.14: supported on static checks"
    assert not versions.is_supported("0.25.1"), "read, not brought into the range"
    assert not versions.is_supported("0.29.9") and not versions.is_supported("0.3.0") and not versions.is_supported("")
    assert versions.supported_range() == "0.26.x, 0.30.x to 0.34.x"


def test_installs_pick_the_newest_supported_release_and_the_newest_with_a_cpu_build():
    assert versions.newest_supported().release == "0.34.0"
    assert versions.newest_supported(cpu_build=True).release == "0.32.0"
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert 'VLLM_VERSION="0.32.0"' in bootstrap and 'VLLM_GPU_VERSION="0.34.0"' in bootstrap, \
        "make setup installs what the version table calls newest: update scripts/bootstrap.sh with it"


def test_a_module_gone_in_a_release_takes_its_targets_with_it():
    """0.34 dropped the V1 model runners: nothing is patched there, and the CPU runner's step is the V2 runner's."""
    targets = {(m, a) for m, a, _ in versions.hook_targets("0.34.0")}
    assert not any(m == "vllm.v1.worker.gpu_model_runner" for m, _ in targets)
    assert ("vllm.v1.worker.cpu.model_runner", "CPUModelRunner.execute_model") in targets
    assert ("vllm.config.vllm", "VllmConfig._resolve_extensible_kv_cache") in targets
    assert ("vllm.config.vllm", "VllmConfig._resolve_extensible_kv_cache") not in {
        (m, a) for m, a, _ in versions.hook_targets("0.32.0")}


def test_each_generation_has_its_own_allocation_targets():
    """0.25/0.26 allocate a tensor per KV cache tensor; 0.30+ one backing allocation: a row's targets are its own."""
    per_layer = {(m, a) for m, a, _ in versions.hook_targets("0.26.0")}
    backing = {(m, a) for m, a, _ in versions.hook_targets("0.32.0")}
    assert ("vllm.v1.worker.gpu.attn_utils", "init_kv_cache") in per_layer - backing
    assert ("vllm.v1.worker.utils", "allocate_kv_cache") in backing - per_layer
    assert ("vllm.v1.core.block_pool", "BlockPool.get_new_blocks") in per_layer & backing
