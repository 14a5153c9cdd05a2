"""`kvlab doctor`: a dry run of what the notebooks would do on this machine (device, driver, the vLLM build an install
would pick, models, dtype, each notebook's GPU memory plan) and the checks that need nothing started. Exit 0 when
every check passes, 1 when one fails (its line says what to do)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="what the notebooks would do here (device, vLLM build, memory plan); checks",
                       description=__doc__)
    p.add_argument("--json", action="store_true", help="print the facts and checks as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from kvlab.notebooks.doctor import diagnose
    from kvlab.probes.nvml import gpu_facts

    facts = gpu_facts()
    lines, checks = diagnose(facts)
    if args.json:
        print(json.dumps({"nvml": facts, "lines": lines, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print("\n".join(lines))
        print()
        for c in checks:
            print(f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    return 0 if all(c.ok for c in checks) else 1
