"""Concurrent limit changes from several processes, driven by hypothesis: every value a record holds is one that
somebody wrote (no torn write, no wrapped size, no lost lease), whatever order the processes run in."""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvcached import budget
from kvcached.budget import BudgetRecord
from kvcached.units import MAX_BYTES

M = 1 << 20
POOL = 64 * M
WORKERS = 3
VALUES = st.one_of(st.integers(0, POOL), st.sampled_from([0, MAX_BYTES, MAX_BYTES + 1, -1, 1 << 64]))


def _worker(conn, shm_dir: str) -> None:
    """One admin process: runs the operations it is sent, answers what happened."""
    os.environ["KVCACHED_SHM_DIR"] = shm_dir
    lease = None
    while True:
        op = conn.recv()
        if op is None:
            return
        kind, value = op
        try:
            if kind == "set":
                budget.set_limit("pool", value)
            elif kind == "lease":
                if lease is None or lease.released:
                    lease = budget.lease_limit("pool", value, ttl_s=3600)
            elif kind == "release" and lease is not None:
                lease.release()
            conn.send(("ok", kind, value))
        except (ValueError, RuntimeError) as exc:  # refused input, or a lease another worker holds
            conn.send(("refused", kind, str(exc)))


class AdminProtocol(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.shm_dir = os.environ["KVCACHED_SHM_DIR"]
        self.record = BudgetRecord.create(POOL, name="pool")
        ctx = mp.get_context("fork")
        self.conns, self.procs = [], []
        for _ in range(WORKERS):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, self.shm_dir), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.base_written = {POOL}
        self.lease_values: set[int] = set()

    @rule(ops=st.lists(st.tuples(st.sampled_from(["set", "set", "lease", "release"]), VALUES),
                       min_size=1, max_size=WORKERS))
    def burst(self, ops) -> None:
        """One operation per worker, all sent before any answer is read: they race."""
        for conn, op in zip(self.conns, ops):
            conn.send(op)
        for conn, (kind, value) in zip(self.conns, ops):
            status, _, _ = conn.recv()
            if status == "ok" and kind == "set":
                self.base_written.add(value)
            if status == "ok" and kind == "lease":
                self.lease_values.add(value)

    @invariant()
    def only_written_values(self) -> None:
        if not hasattr(self, "record"):
            return
        info = budget.find_instance("pool")
        assert info.limit_bytes in self.base_written, f"limit {info.limit_bytes} was never written"
        assert 0 <= info.limit_bytes <= MAX_BYTES
        if info.lease_limit_bytes is not None:
            assert info.lease_limit_bytes in self.lease_values
            assert info.effective_limit_bytes == min(info.limit_bytes, info.lease_limit_bytes)
        else:
            assert info.effective_limit_bytes == info.limit_bytes
        assert self.record.limit_bytes == info.effective_limit_bytes

    def teardown(self) -> None:
        if not hasattr(self, "record"):
            return
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(10)
        self.record.close()


@pytest.mark.faults
def test_concurrent_admin_changes_leave_only_written_values(shm_dir):
    AdminProtocol.TestCase.settings = settings(max_examples=15, stateful_step_count=8, deadline=None,
                                               suppress_health_check=list(HealthCheck))
    AdminProtocol.TestCase().runTest()
