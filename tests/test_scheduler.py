"""Scheduling: one sync per run, collapsing, retries, the pool bound."""

import threading
import time

from wandb_offline_sync.scheduler import SyncScheduler
from wandb_offline_sync.wandbcli import (
    Attempt, NOT_READY, OK, PERMANENT, TRANSIENT)


def _attempt(outcome, reason="scripted"):
    now = time.time()
    return Attempt(started=now, ended=now, exit_code=0, timed_out=False,
                   outcome=outcome, reason=reason, stderr_tail=[],
                   argv=["wandb"])


class ScriptedSync:
    """A sync callable whose outcomes and duration a test controls."""

    def __init__(self, outcomes=(OK,), hold=None):
        self.outcomes = list(outcomes)
        self.hold = hold          # an Event each sync waits for, if set
        self.calls = []
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0

    def __call__(self, record):
        with self.lock:
            self.calls.append(record.final_requested)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            index = len(self.calls) - 1
        try:
            if self.hold is not None:
                self.hold.wait(10)
            outcome = self.outcomes[min(index, len(self.outcomes) - 1)]
            return _attempt(outcome)
        finally:
            with self.lock:
                self.running -= 1


def _scheduler(sync, **settings):
    settings.setdefault("backoff_base", 0.01)
    settings.setdefault("backoff_cap", 0.05)
    return SyncScheduler(sync, **settings)


def test_requests_during_a_sync_collapse_into_one_follow_up():
    hold = threading.Event()
    sync = ScriptedSync(hold=hold)
    scheduler = _scheduler(sync, max_workers=3)
    try:
        scheduler.request("/runs/a", "a")
        assert _wait(lambda: sync.calls)
        for _ in range(25):
            state = scheduler.request("/runs/a", "a")
        assert state["state"] == "syncing"
        assert state["follow_up_pending"]
        hold.set()
        assert scheduler.wait_idle(5)
    finally:
        scheduler.close()
    assert len(sync.calls) == 2


def test_transient_failures_are_retried_with_growing_delay():
    sync = ScriptedSync([TRANSIENT, TRANSIENT, OK])
    scheduler = _scheduler(sync)
    try:
        scheduler.request("/runs/a", "a")
        assert scheduler.wait_idle(5)
        record = scheduler.get("/runs/a")
    finally:
        scheduler.close()
    assert len(sync.calls) == 3
    assert record["state"] == "idle"
    assert record["failures_in_a_row"] == 0


def test_final_sync_is_retried_until_it_succeeds():
    sync = ScriptedSync([NOT_READY, TRANSIENT, TRANSIENT, OK])
    scheduler = _scheduler(sync)
    try:
        scheduler.request("/runs/a", "a", final=True)
        assert scheduler.wait_idle(5)
        record = scheduler.get("/runs/a")
    finally:
        scheduler.close()
    assert sync.calls == [True] * 4
    assert record["state"] == "done"


def test_not_ready_mid_run_waits_for_the_next_request():
    sync = ScriptedSync([NOT_READY, OK])
    scheduler = _scheduler(sync)
    try:
        scheduler.request("/runs/a", "a")
        assert scheduler.wait_idle(5)
        assert len(sync.calls) == 1
        assert scheduler.get("/runs/a")["state"] == "idle"
    finally:
        scheduler.close()


def test_permanent_failure_stops_retries_and_says_why():
    sync = ScriptedSync([PERMANENT])
    scheduler = _scheduler(sync, permanent_cooldown=60)
    try:
        scheduler.request("/runs/a", "a")
        assert scheduler.wait_idle(5)
        scheduler.request("/runs/a", "a")     # inside the cool-down
        time.sleep(0.1)
        record = scheduler.get("/runs/a")
    finally:
        scheduler.close()
    assert len(sync.calls) == 1
    assert record["state"] == "failed"
    assert record["last_attempt"]["reason"] == "scripted"


def test_a_final_request_retries_a_failed_run_at_once():
    sync = ScriptedSync([PERMANENT, OK])
    scheduler = _scheduler(sync, permanent_cooldown=60)
    try:
        scheduler.request("/runs/a", "a")
        assert scheduler.wait_idle(5)
        scheduler.request("/runs/a", "a", final=True)
        assert scheduler.wait_idle(5)
        record = scheduler.get("/runs/a")
    finally:
        scheduler.close()
    assert record["state"] == "done"


def test_endless_transient_failures_are_given_up():
    sync = ScriptedSync([TRANSIENT])
    scheduler = _scheduler(sync, max_failures=4)
    try:
        scheduler.request("/runs/a", "a", final=True)
        assert scheduler.wait_idle(5)
        record = scheduler.get("/runs/a")
    finally:
        scheduler.close()
    assert len(sync.calls) == 4
    assert record["state"] == "failed"


def test_pool_bounds_concurrent_syncs():
    hold = threading.Event()
    sync = ScriptedSync(hold=hold)
    scheduler = _scheduler(sync, max_workers=2)
    try:
        for name in "abcdef":
            scheduler.request("/runs/" + name, name)
        assert _wait(lambda: sync.running == 2)
        time.sleep(0.1)
        states = sorted(r["state"] for r in scheduler.status())
        hold.set()
        assert scheduler.wait_idle(5)
    finally:
        scheduler.close()
    assert sync.most_running == 2
    assert states == ["queued"] * 4 + ["syncing"] * 2
    assert len(sync.calls) == 6


def test_new_runs_past_the_limit_are_refused_until_runs_finish():
    from wandb_offline_sync.errors import FarmBusy
    hold = threading.Event()
    sync = ScriptedSync(hold=hold)
    scheduler = _scheduler(sync, max_runs=2)
    try:
        scheduler.request("/runs/a", "a")
        scheduler.request("/runs/b", "b", final=True)
        try:
            scheduler.request("/runs/c", "c")
        except FarmBusy:
            refused = True
        else:
            refused = False
        hold.set()
        assert scheduler.wait_idle(5)
        scheduler.request("/runs/c", "c")   # b is done: it makes room
    finally:
        scheduler.close()
    assert refused


def test_done_runs_are_forgotten_after_a_while():
    clock = [1000.0]
    sync = ScriptedSync()
    scheduler = _scheduler(sync, clock=lambda: clock[0], forget_after=60)
    try:
        scheduler.request("/runs/a", "a", final=True)
        assert scheduler.wait_idle(5)
        assert len(scheduler.status()) == 1
        clock[0] += 61
        assert scheduler.status() == []
    finally:
        scheduler.close()


def _wait(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False
