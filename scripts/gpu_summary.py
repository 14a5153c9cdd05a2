"""Summarise a scripts/gpu_check.sh results folder: test counts, the map/unmap table with ratios, the mini engine.

Writes summary.json and summary.md into the folder and prints the table. Missing parts are reported as such
(a step that failed leaves no JSON), never filled in.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(folder: Path) -> dict | None:
    try:
        root = ET.parse(folder / "pytest_junit.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_names"] = [c.get("name") for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
    return counts


def _cell(d: dict | None, key: str) -> str:
    if not d or key not in d:
        return "-"
    return f"{d[key]['median']:.1f} (p90 {d[key]['p90']:.1f})"


def summarise(folder: Path) -> tuple[dict, str]:
    env = _load(folder / "env.json") or {}
    tests = _tests(folder)
    alloc = _load(folder / "bench_alloc_cuda.json")
    cmp_ = _load(folder / "upstream_vmm.json") or {}
    ours, up = cmp_.get("ours"), cmp_.get("upstream")
    mini = _load(folder / "mini_engine.json")
    lines = [f"# GPU check: {env.get('gpu', 'unknown GPU')}", "",
             f"driver {env.get('driver', '?')}, torch {env.get('torch', '?')}, python {env.get('python', '?')}", ""]
    if tests:
        lines.append(f"pytest -m gpu tests/gpu: {tests['passed']} passed, {tests['failures']} failed, "
                     f"{tests['errors']} errors, {tests['skipped']} skipped"
                     + (f" (failed: {', '.join(tests['failed_names'])})" if tests["failed_names"] else ""))
    else:
        lines.append("pytest -m gpu tests/gpu: no report (see log.txt)")
    lines += ["", "| µs per 2 MiB page, median (p90) | map | unmap |", "| --- | --- | --- |"]
    if alloc:
        lines.append(f"| ours, PageAllocator + budget, handle pool | {_cell(alloc, 'map_us')} | "
                     f"{_cell(alloc, 'unmap_us')} |")
        lines.append(f"| ours, PageAllocator + budget, no pool | {_cell(alloc, 'map_nopool_us')} | "
                     f"{_cell(alloc, 'unmap_nopool_us')} |")
    if ours and "error" not in ours:
        lines.append(f"| ours, Region.map/unmap, handle pool | {_cell(ours, 'map_us')} | {_cell(ours, 'unmap_us')} |")
        lines.append(f"| ours, Region.map/unmap, no pool | {_cell(ours, 'map_nopool_us')} | "
                     f"{_cell(ours, 'unmap_nopool_us')} |")
    if up and "error" not in up:
        lines.append(f"| upstream kvcached {up.get('version', '?')} vmm_ops | {_cell(up, 'map_us')} | "
                     f"{_cell(up, 'unmap_us')} |")
    lines.append("")
    if alloc:
        lines.append(f"bench alloc: region create {alloc['create_us']:.0f} µs; (map+unmap)/first-touch memset "
                     f"{alloc['ratio']:.2f}")
    if "ratio_map_unmap" in cmp_:
        lines.append(f"ours/upstream (map+unmap, Region level): pool {cmp_['ratio_map_unmap']:.2f}, "
                     f"no pool {cmp_['ratio_map_unmap_nopool']:.2f}; map {cmp_['ratio_map']:.2f}, "
                     f"unmap {cmp_['ratio_unmap']:.2f}; create {cmp_['ratio_create']:.2f} "
                     f"(ours {ours['create_us']:.0f} µs, upstream {up['create_us']:.0f} µs)")
        if alloc and up:
            full = alloc["map_nopool_us"]["median"] + alloc["unmap_nopool_us"]["median"]
            base = up["map_us"]["median"] + up["unmap_us"]["median"]
            lines.append(f"ours/upstream (map+unmap, ours through PageAllocator + budget, no pool): {full / base:.2f}")
    else:
        for side in ("ours", "upstream"):
            d = cmp_.get(side)
            if d and "error" in d:
                lines.append(f"{side} VMM bench failed: {d['error'].splitlines()[-1] if d['error'] else '?'}")
        if not cmp_:
            lines.append("upstream comparison: no result (see log.txt)")
    lines.append("")
    if mini:
        lines.append(f"mini engine: {mini['steps']} steps, {mini['requests_finished']} requests finished, "
                     f"{mini['map_events']} map / {mini['unmap_events']} unmap events, mapped pages "
                     f"{mini['min_mapped_pages']}..{mini['max_mapped_pages']} of {mini['region_pages']}, "
                     f"mismatched steps {mini['mismatched_steps']}: "
                     f"{'EQUAL' if mini['equal'] else 'DIFFERENT'}")
    else:
        lines.append("mini engine: no result (see log.txt)")
    summary = {"env": env, "tests": tests, "bench_alloc": alloc, "upstream_comparison": cmp_, "mini_engine": mini}
    return summary, "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/gpu_summary.py RESULTS_DIR", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    summary, text = summarise(folder)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (folder / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
