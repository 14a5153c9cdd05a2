"""kvctl: list kvcached pools and change their memory limits while the engines run.

Every change goes through kvcached's admin module (kvcached.budget.admin), validated and under the record's lock;
the engines' allocators notice within a fraction of a second. Bad input exits with status 2 and changes nothing.
Listing and watching also reap what dead processes left behind (their records and files).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

from kvcached import budget
from kvcached.shm import ShmDirError, shm_dir
from kvcached.units import format_size, parse_percent, parse_size

EPILOG = """examples:
  kvctl list                      table of pools (and of record files that cannot be read)
  kvctl list --json               JSON array: name, group, pid, used_bytes, reserved_bytes, floor_bytes,
                                  retained_bytes, limit_bytes, ...
  kvctl limit llama-0 2G          cap one pool at 2 GiB (idle pages above it are given back)
  kvctl limit llama-0 none        back to the whole pool
  kvctl limit-percent llama-0 50  cap at 50% of the pool's virtual size
  kvctl group-limit shared 6G     cap the sum of a group (KVCACHED_IPC_NAME) at 6 GiB
  kvctl group-limit shared none   remove the group cap
  kvctl cleanup                   remove records (and pool files) of dead processes, and unreadable records
  kvctl watch -n 1                refresh the table every second

columns: RESERVED is what a pool maps now. Of it, FLOOR stays while the engine runs (the null block's page and warm
pages) and RETAINED is free prefix cache kept for repeated prompts, given back at once when a limit, a group
neighbour or short memory wants it (KVCACHED_MAX_CACHED_TOKENS caps it).

sizes: bytes or K/M/G/T/P/E (binary), 0 .. 2^63-1 bytes.
records live in $KVCACHED_SHM_DIR (default /dev/shm/kvcached)."""


class UsageError(Exception):
    """Bad input: reported on stderr with exit status 2."""


def _size_or_none(text: str) -> int | None:
    if text.strip().lower() in ("none", "off", "unlimited"):
        return None
    return parse_size(text)


def _limit_cell(info: budget.InstanceInfo) -> str:
    if info.lease_limit_bytes is None:
        return format_size(info.limit_bytes)
    return f"{format_size(info.effective_limit_bytes)} (lease, pid {info.lease_holder_pid})"


def render_table() -> str:
    """The `kvctl list` table as plain text."""
    instances = budget.list_instances()
    unreadable = budget.list_unreadable()
    if not instances and not unreadable and not budget.list_stores():
        return f"no kvcached pools in {shm_dir()}"
    # FLOOR and RETAINED split what a pool holds beyond its requests' blocks: the floor stays (the null block's
    # page, warm pages); the retained prefix cache goes to whoever needs the memory.
    headers = ("NAME", "GROUP", "PID", "STATE", "USED", "RESERVED", "FLOOR", "RETAINED", "LIMIT", "VIRTUAL")
    rows = [(i.name, i.group, str(i.pid), "alive" if i.alive else "DEAD", format_size(i.used_bytes),
             format_size(i.reserved_bytes), format_size(i.floor_bytes), format_size(i.retained_bytes),
             _limit_cell(i), format_size(i.virtual_bytes)) for i in instances]
    rows += [(u.name, "?", str(u.pid or "?"), "UNREADABLE", "", "", "", "", "", "") for u in unreadable]
    rows += [(s.name, s.group, "-", "store" if s.exists else "store (gone)", format_size(s.used_bytes),
              format_size(s.used_bytes), "", "", "none" if s.limit_bytes is None else format_size(s.limit_bytes),
              "") for s in budget.list_stores()]
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (headers, *rows)]
    for u in unreadable:
        fate = "kept while its writer runs" if u.alive else "`kvctl cleanup` removes it"
        lines.append(f"unreadable {u.path}: {u.reason} ({fate})")
    caps = [g for g in budget.list_groups() if g.cap_bytes is not None]
    for g in caps:
        lines.append(f"group {g.name}: reserved {format_size(g.reserved_bytes)} of cap {format_size(g.cap_bytes)}"
                     f" ({g.members} live)")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    budget.reap()
    if args.json:
        rows = [{"kind": "pool", **i.to_dict()} for i in budget.list_instances()]
        rows += [_store_row(s) for s in budget.list_stores()]
        print(json.dumps(rows, indent=2))
        for u in budget.list_unreadable():
            print(f"kvctl: unreadable record {u.path}: {u.reason}", file=sys.stderr)
    else:
        print(render_table())
    return 0


def _store_row(s: budget.StoreInfo) -> dict:
    """A prefix store in `kvctl list --json`, with the fields every row has (a store has no owner process)."""
    return {"kind": "prefix_store", "name": s.name, "group": s.group, "pid": None, "used_bytes": s.used_bytes,
            "reserved_bytes": s.used_bytes, "limit_bytes": s.limit_bytes, "alive": s.exists, "root": s.root,
            "path": s.path}


def cmd_limit(args: argparse.Namespace) -> int:
    size = _size_or_none(args.size)
    if not _is_pool(args.name) and any(s.name == args.name for s in budget.list_stores()):
        from kvcached.prefix_store import PrefixStore

        store = budget.set_store_limit(args.name, size)
        PrefixStore.enforce_cap_of(store)
        store = budget.find_store(args.name)
        cap = "none" if store.limit_bytes is None else format_size(store.limit_bytes)
        print(f"{store.name}: prefix store cap {cap} (holds {format_size(store.used_bytes)})")
        return 0
    info = budget.find_instance(args.name)
    new = budget.set_limit(args.name, info.virtual_bytes if size is None else size)
    print(f"{new.name}: limit {format_size(new.limit_bytes)} (reserved {format_size(new.reserved_bytes)})")
    return 0


def _is_pool(name: str) -> bool:
    try:
        budget.find_instance(name)
    except KeyError:
        return False
    return True


def cmd_limit_percent(args: argparse.Namespace) -> int:
    new = budget.set_limit_percent(args.name, parse_percent(args.percent))
    print(f"{new.name}: limit {format_size(new.limit_bytes)} (reserved {format_size(new.reserved_bytes)})")
    return 0


def cmd_group_limit(args: argparse.Namespace) -> int:
    g = budget.set_group_limit(args.group, _size_or_none(args.size), create=args.create)
    cap = "none" if g.cap_bytes is None else format_size(g.cap_bytes)
    print(f"group {g.name}: cap {cap} (reserved {format_size(g.reserved_bytes)}, {g.members} live)")
    return 0


def cmd_cleanup(_: argparse.Namespace) -> int:
    removed = budget.cleanup()
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print("nothing to clean up")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    if not args.interval > 0 or args.interval == float("inf"):
        raise UsageError("--interval must be a number of seconds more than 0")
    try:
        while True:
            budget.reap()
            sys.stdout.write("\x1b[H\x1b[2J" + render_table() + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvctl", description=__doc__,
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("list", help="list pools (live and dead) and unreadable record files")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("limit", help="set a pool's limit, or a prefix store's cap (SIZE like 512M, 2G, or `none`)")
    p.add_argument("name", help="the pool's or the store's exact name, as `kvctl list` shows it")
    p.add_argument("size")
    p.set_defaults(func=cmd_limit)
    p = sub.add_parser("limit-percent", help="set a pool's limit as a percentage of its virtual size")
    p.add_argument("name", help="the pool's exact name")
    p.add_argument("percent")
    p.set_defaults(func=cmd_limit_percent)
    p = sub.add_parser("group-limit", help="cap a group's total (SIZE, or `none` to remove the cap)")
    p.add_argument("group")
    p.add_argument("size")
    p.add_argument("--create", action="store_true", help="allow a group with no pools yet (cap before start)")
    p.set_defaults(func=cmd_group_limit)
    p = sub.add_parser("cleanup", help="remove what dead processes left: records, their pool files, empty groups")
    p.set_defaults(func=cmd_cleanup)
    p = sub.add_parser("watch", help="redraw the table every few seconds (Ctrl-C stops)")
    p.add_argument("-n", "--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.set_defaults(func=cmd_watch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse reads `-1G` as an unknown option; a leading space keeps it a value so parse_size can say
    # "sizes cannot be negative" instead of a confusing "missing argument".
    argv = [" " + a if re.match(r"^-\d", a) else a for a in argv]
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyError as exc:
        print(f"kvctl: {exc.args[0]}", file=sys.stderr)
    except (ValueError, UsageError, ShmDirError, FileExistsError) as exc:
        print(f"kvctl: {exc}", file=sys.stderr)
    except RuntimeError as exc:  # a lease held by another process
        print(f"kvctl: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
