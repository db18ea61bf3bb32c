"""Live mode and supervision, with scripted live syncs and a frozen clock.
"""

import os
import threading
import time

from wandb_offline_sync.scheduler import SyncScheduler
from wandb_offline_sync.state import StateStore
from wandb_offline_sync.wandbcli import Attempt, OK, TRANSIENT

from test_scheduler import ScriptedSync, _wait


class FakeLive:
    """Stands in for wandbcli.LiveSync; the test decides when it ends."""

    def __init__(self, pid):
        self.pid = pid
        self.code = None
        self.error_lines = 0
        self.last_error = None
        self.terminated = False
        self.killed = False
        self.ignore_terminate = False
        self.run_urls = {}

    def poll(self):
        return self.code

    def read_new_lines(self):
        return []

    def terminate(self):
        self.terminated = True
        if not self.ignore_terminate:
            self.code = -15

    def kill(self):
        self.killed = True
        self.code = -9

    def finish(self):
        outcome = OK if self.code == 0 and not self.error_lines \
            else TRANSIENT
        now = time.time()
        return Attempt(started=now, ended=now, exit_code=self.code,
                       timed_out=False, outcome=outcome, reason="scripted",
                       stderr_tail=[], argv=["wandb", "beta"])


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Lives:
    """The start_live callable: records every live sync it starts."""

    def __init__(self):
        self.started = []
        self.lock = threading.Lock()

    def __call__(self, records):
        with self.lock:
            live = FakeLive(1000 + len(self.started))
            self.started.append(([r.run_dir for r in records], live))
            return live

    def last(self):
        with self.lock:
            return self.started[-1][1]


def _scheduler(tmp_path, sync=None, clock=None, **settings):
    settings.setdefault("tick", 0.01)
    settings.setdefault("watch_interval", 0.0)
    settings.setdefault("backoff_base", 1.0)
    settings.setdefault("backoff_cap", 1.0)
    settings.setdefault("live_group_wait", 0.0)
    lives = Lives()
    scheduler = SyncScheduler(sync or ScriptedSync(), start_live=lives,
                              clock=clock or Clock(), **settings)
    return scheduler, lives


def _run_dir(tmp_path, name="r1"):
    run_dir = tmp_path / name
    run_dir.mkdir()
    log = run_dir / ("run-%s.wandb" % name)
    log.write_bytes(b"header and a first record" * 4)
    return str(run_dir), str(log)


def test_first_request_starts_one_live_sync_and_later_ones_are_heartbeats(
        tmp_path):
    sync = ScriptedSync()
    scheduler, lives = _scheduler(tmp_path, sync)
    run_dir, log = _run_dir(tmp_path)
    try:
        scheduler.request(run_dir, "r1", wandb_file=log)
        assert _wait(lambda: len(lives.started) == 1)
        for _ in range(20):
            state = scheduler.request(run_dir, "r1", wandb_file=log)
        time.sleep(0.1)
        assert len(lives.started) == 1
        assert state["mode"] == "live"
        assert state["state"] == "live"
        assert state["live"]["alive"]
        assert state["requests"] == 21
    finally:
        scheduler.close()
    assert sync.calls == []


def test_live_sync_that_ends_by_itself_completes_the_run(tmp_path):
    sync = ScriptedSync()
    scheduler, lives = _scheduler(tmp_path, sync)
    run_dir, log = _run_dir(tmp_path)
    try:
        scheduler.request(run_dir, "r1", wandb_file=log)
        assert _wait(lambda: lives.started)
        scheduler.request(run_dir, "r1", final=True, wandb_file=log)
        lives.last().code = 0
        assert _wait(lambda: scheduler.get(run_dir)["state"] == "done")
    finally:
        scheduler.close()
    assert sync.calls == [], "no ordinary sync was needed"


def test_live_sync_still_running_after_the_grace_is_replaced_by_a_sync(
        tmp_path):
    clock = Clock()
    sync = ScriptedSync()
    scheduler, lives = _scheduler(tmp_path, sync, clock, live_grace=30)
    run_dir, log = _run_dir(tmp_path)
    try:
        scheduler.request(run_dir, "r1", wandb_file=log)
        assert _wait(lambda: lives.started)
        scheduler.request(run_dir, "r1", final=True, wandb_file=log)
        time.sleep(0.1)
        assert not lives.last().terminated
        clock.now += 31
        assert _wait(lambda: scheduler.get(run_dir)["state"] == "done")
    finally:
        scheduler.close()
    assert lives.last().terminated
    assert sync.calls == [True]


def test_quiet_run_is_stopped_and_finished_as_crashed(tmp_path):
    clock = Clock()
    sync = ScriptedSync()
    scheduler, lives = _scheduler(tmp_path, sync, clock, stale_after=60)
    run_dir, log = _run_dir(tmp_path)
    try:
        scheduler.request(run_dir, "r1", wandb_file=log)
        assert _wait(lambda: lives.started)
        clock.now += 30
        with open(log, "ab") as f:
            f.write(b"more")                 # still growing: not quiet
        time.sleep(0.1)
        clock.now += 40
        time.sleep(0.1)
        assert not lives.last().terminated
        clock.now += 30                      # 70 s since the last growth
        assert _wait(lambda: scheduler.get(run_dir)["state"] == "done")
        record = scheduler.get(run_dir)
    finally:
        scheduler.close()
    assert lives.last().terminated
    assert record["went_quiet"] and record["final_requested"]
    assert sync.calls == [True]


def test_live_sync_killed_from_outside_is_restarted_with_backoff(
        tmp_path):
    clock = Clock()
    scheduler, lives = _scheduler(tmp_path, clock=clock, backoff_base=5,
                                  backoff_cap=5)
    run_dir, log = _run_dir(tmp_path)
    try:
        scheduler.request(run_dir, "r1", wandb_file=log)
        assert _wait(lambda: lives.started)
        lives.last().code = -9
        assert _wait(lambda: scheduler.get(run_dir)["live"]["restarts"])
        time.sleep(0.1)
        assert len(lives.started) == 1, "waits for its backoff"
        clock.now += 6
        assert _wait(lambda: len(lives.started) == 2)
        assert scheduler.get(run_dir)["state"] == "live"
    finally:
        scheduler.close()


def test_runs_beyond_max_live_are_synced_periodically(tmp_path):
    sync = ScriptedSync()
    scheduler, lives = _scheduler(tmp_path, sync, max_live=2)
    try:
        for name in ("a", "b", "c"):
            run_dir, log = _run_dir(tmp_path, name)
            scheduler.request(run_dir, name, wandb_file=log)
        assert _wait(lambda: sum(len(dirs) for dirs, _ in lives.started)
                     == 2)
        assert scheduler.wait_idle(5)
        modes = sorted(r["mode"] for r in scheduler.status())
    finally:
        scheduler.close()
    assert modes == ["live", "live", "periodic"]
    assert len(sync.calls) == 1


def test_periodic_request_with_an_unchanged_log_runs_nothing(tmp_path):
    sync = ScriptedSync()
    scheduler = SyncScheduler(sync, tick=0.01)
    run_dir, log = _run_dir(tmp_path)
    try:
        scheduler.request(run_dir, "r1", wandb_file=log)
        assert scheduler.wait_idle(5)
        scheduler.request(run_dir, "r1", wandb_file=log)
        assert scheduler.wait_idle(5)
        assert len(sync.calls) == 1
        with open(log, "ab") as f:
            f.write(b"more")
        scheduler.request(run_dir, "r1", wandb_file=log)
        assert scheduler.wait_idle(5)
    finally:
        scheduler.close()
    assert len(sync.calls) == 2


def test_state_survives_a_restart_and_final_syncs_resume(tmp_path):
    store = StateStore(str(tmp_path / "state"))
    hold = threading.Event()
    first = SyncScheduler(ScriptedSync(hold=hold), store=store, tick=0.01)
    done_dir, done_log = _run_dir(tmp_path, "done")
    final_dir, final_log = _run_dir(tmp_path, "final")
    active_dir, active_log = _run_dir(tmp_path, "active")
    first.request(done_dir, "done", final=True, wandb_file=done_log)
    first.request(final_dir, "final", final=True, wandb_file=final_log)
    first.request(active_dir, "active", wandb_file=active_log)
    # The farm dies while every sync is still running: nothing finished.
    saved = {r["run_id"]: r for r in store.load()}
    assert saved["final"]["final_requested"]
    assert not saved["active"]["final_requested"]
    first.stop_accepting()

    sync = ScriptedSync()
    second = SyncScheduler(sync, store=store, tick=0.01)
    try:
        assert second.wait_idle(5)
        states = {r["run_id"]: r for r in second.status()}
    finally:
        second.close()
        hold.set()
        first.close()
    assert states["final"]["state"] == "done"
    assert states["done"]["state"] == "done"
    assert states["active"]["state"] == "idle"
    assert sorted(sync.calls) == [False, True, True]


def test_unreadable_state_file_is_moved_aside(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "runs.json").write_text("{half a file")
    store = StateStore(str(state_dir))
    assert store.load() == []
    assert [p for p in os.listdir(str(state_dir))
            if p.startswith("runs.json.unreadable-")]


def test_runs_that_arrive_together_share_one_live_sync(tmp_path):
    clock = Clock()
    scheduler, lives = _scheduler(tmp_path, clock=clock, live_group_wait=5,
                                  live_group_size=3)
    try:
        for name in ("a", "b", "c", "d"):
            run_dir, log = _run_dir(tmp_path, name)
            scheduler.request(run_dir, name, wandb_file=log)
        # Three fill a process at once; the fourth waits for company.
        assert _wait(lambda: len(lives.started) == 1)
        time.sleep(0.1)
        assert len(lives.started) == 1
        clock.now += 6
        assert _wait(lambda: len(lives.started) == 2)
        time.sleep(0.1)
        sizes = sorted(len(dirs) for dirs, _ in lives.started)
        record = scheduler.get(str(tmp_path / "a"))
    finally:
        scheduler.close()
    assert sizes == [1, 3]
    assert record["live"]["alive"]


def test_a_header_only_log_waits_before_joining_a_live_sync(tmp_path):
    scheduler, lives = _scheduler(tmp_path)
    run_dir, log = _run_dir(tmp_path)
    with open(log, "wb") as f:
        f.write(b"header!")
    try:
        scheduler.request(run_dir, "r1", wandb_file=log)
        time.sleep(0.2)
        assert lives.started == []
        with open(log, "ab") as f:
            f.write(b"x" * 100)
        assert _wait(lambda: len(lives.started) == 1)
    finally:
        scheduler.close()


def test_a_run_marked_synced_is_done_while_its_process_goes_on(tmp_path):
    clock = Clock()
    scheduler, lives = _scheduler(tmp_path, clock=clock, live_group_wait=5)
    a_dir, a_log = _run_dir(tmp_path, "a")
    b_dir, b_log = _run_dir(tmp_path, "b")
    try:
        scheduler.request(a_dir, "a", wandb_file=a_log)
        scheduler.request(b_dir, "b", wandb_file=b_log)
        time.sleep(0.1)
        clock.now += 6
        assert _wait(lambda: len(lives.started) == 1)
        assert lives.started[0][0] == [a_dir, b_dir]
        with open(a_log + ".synced", "w"):
            pass
        assert _wait(lambda: scheduler.get(a_dir)["state"] == "done")
        assert scheduler.get(b_dir)["state"] == "live"
        assert not lives.last().terminated
    finally:
        scheduler.close()


def test_a_quiet_run_stops_its_process_and_the_others_move_on(tmp_path):
    clock = Clock()
    sync = ScriptedSync()
    scheduler, lives = _scheduler(tmp_path, sync, clock, stale_after=60,
                                  live_group_wait=5)
    a_dir, a_log = _run_dir(tmp_path, "a")
    b_dir, b_log = _run_dir(tmp_path, "b")
    try:
        scheduler.request(a_dir, "a", wandb_file=a_log)
        scheduler.request(b_dir, "b", wandb_file=b_log)
        time.sleep(0.1)
        clock.now += 6
        assert _wait(lambda: len(lives.started) == 1)
        clock.now += 44
        scheduler.request(b_dir, "b", wandb_file=b_log)   # b is alive
        clock.now += 20                                  # a went quiet
        assert _wait(lambda: scheduler.get(a_dir)["state"] == "done")
        time.sleep(0.1)
        clock.now += 6                                   # b regroups
        assert _wait(lambda: len(lives.started) == 2)
        assert lives.started[1][0] == [b_dir]
        record = scheduler.get(b_dir)
    finally:
        scheduler.close()
    assert lives.started[0][1].terminated
    assert sync.calls == [True], "one ordinary sync, for the quiet run"
    assert record["state"] == "live"
    assert record["failures_in_a_row"] == 0


def test_a_run_marked_synced_after_errors_gets_an_ordinary_sync(tmp_path):
    sync = ScriptedSync()
    scheduler, lives = _scheduler(tmp_path, sync)
    run_dir, log = _run_dir(tmp_path)
    try:
        scheduler.request(run_dir, "r1", wandb_file=log)
        assert _wait(lambda: lives.started)
        lives.last().error_lines = 1       # e.g. a lost upload
        with open(log + ".synced", "w"):
            pass
        assert _wait(lambda: scheduler.get(run_dir)["state"] == "done")
    finally:
        scheduler.close()
    assert sync.calls == [True]


def test_runs_beyond_the_live_process_limit_are_synced_periodically(
        tmp_path):
    sync = ScriptedSync()
    scheduler, lives = _scheduler(tmp_path, sync, live_group_size=1,
                                  max_live_processes=2)
    try:
        for name in ("a", "b", "c"):
            run_dir, log = _run_dir(tmp_path, name)
            scheduler.request(run_dir, name, wandb_file=log)
            time.sleep(0.1)
        assert _wait(lambda: len(lives.started) == 2)
        assert scheduler.wait_idle(5)
        record = scheduler.get(str(tmp_path / "c"))
    finally:
        scheduler.close()
    assert record["mode"] == "periodic"
    assert len(sync.calls) == 1
