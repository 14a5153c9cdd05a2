"""Memory budgets shared between processes: one record per KV pool, one optional cap per group.

- `records`: the on-disk format (fixed-size structs in small files under the shm directory) and reading it back;
- `owner`: BudgetRecord, the side of the process that maps a pool's memory (reserve, release, headroom);
- `admin`: everyone else (kvctl, kvtop, kvlab, the router): list, limits, group caps, cleanup.
"""
from kvcached.budget.admin import (
    cleanup,
    find_instance,
    group_cap,
    group_reserved,
    list_groups,
    list_instances,
    set_group_limit,
    set_limit,
    set_limit_percent,
)
from kvcached.budget.owner import GROUP_ENV, BudgetRecord, default_group
from kvcached.budget.records import GroupInfo, InstanceInfo, process_start_time
from kvcached.shm import SHM_DIR_ENV, sanitize_name, shm_dir

__all__ = [
    "BudgetRecord", "InstanceInfo", "GroupInfo", "shm_dir", "default_group", "sanitize_name", "list_instances",
    "list_groups", "group_cap", "group_reserved", "find_instance", "set_limit", "set_limit_percent",
    "set_group_limit", "cleanup", "process_start_time", "SHM_DIR_ENV", "GROUP_ENV",
]
