"""Memory budgets shared between processes: one record per KV pool, one optional cap per group.

- `records`: the on-disk format (fixed-size structs in small files under the shm directory) and reading it back as
  hostile input;
- `owner`: BudgetRecord, the side of the process that maps a pool's memory (reserve, release, headroom);
- `admin`: the one way anyone changes a record or a cap (kvctl, kvtop, kvlab, the router, an engine's own resize):
  list, limits, leases, group caps, reaping;
- `stores`: prefix stores as budget citizens (their size, cap and group; the chunks are kvcached.prefix_store's).
"""
from kvcached.budget.admin import (
    DEFAULT_LEASE_S,
    Lease,
    LeaseLost,
    cleanup,
    find_instance,
    group_cap,
    group_reserved,
    lease_limit,
    list_groups,
    list_instances,
    list_unreadable,
    reap,
    set_group_limit,
    set_limit,
    set_limit_percent,
)
from kvcached.budget.owner import GROUP_ENV, BudgetRecord, default_group
from kvcached.budget.records import GroupInfo, InstanceInfo, UnreadableRecord, check_bytes, process_start_time
from kvcached.budget.stores import StoreInfo, find_store, list_stores, set_store_limit
from kvcached.shm import SHM_DIR_ENV, ShmDirError, sanitize_name, shm_dir

__all__ = [
    "BudgetRecord", "InstanceInfo", "GroupInfo", "UnreadableRecord", "Lease", "LeaseLost", "ShmDirError",
    "DEFAULT_LEASE_S", "shm_dir", "default_group", "sanitize_name", "check_bytes", "list_instances",
    "list_unreadable", "list_groups", "group_cap", "group_reserved", "find_instance", "set_limit",
    "set_limit_percent", "lease_limit", "set_group_limit", "reap", "cleanup", "process_start_time", "SHM_DIR_ENV",
    "GROUP_ENV", "StoreInfo", "find_store", "list_stores", "set_store_limit",
]
