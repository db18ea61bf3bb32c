"""When and how each run is synced: live or periodic, retried, supervised.

The scheduler keeps a :class:`RunRecord` per run directory and works in
one of two modes per run:

* **live**: runs are followed by ``wandb beta sync --live``, which sends
  only new rows and keeps a run "running" on W&B.  One such process costs
  about 100 MB, so runs share them: a new run waits up to
  ``live_group_wait`` seconds for others, then up to ``live_group_size``
  runs start one process together.  Runs cannot join a process that is
  running, and stopping one sends every run in it again from the start,
  so a process is only stopped for cause.  Later requests for a followed
  run are heartbeats and cost a dict update.  A run is done when wandb
  marks it synced; the process exits by itself after its last run.  If
  a run has not ended ``live_grace`` seconds after its final request, its
  process is stopped, that run is finished with one ordinary sync, and
  the others start a new live sync.  A process that ends or is killed
  while its runs are active is restarted with backoff.  At most
  ``max_live`` runs are followed live; runs beyond that are synced
  periodically.
* **periodic**: a request queues one ``wandb sync`` unless the run's log
  has not grown since the last successful one.  Requests that arrive
  while it runs collapse into exactly one follow-up.  ``max_workers``
  threads run them, so that many at most run at once.

Either way, a run whose heartbeats stop *and* whose transaction log stops
growing for ``stale_after`` seconds is taken to have died without a
final request (kill -9, node failure): its live sync is stopped (the
other runs in it start a new one) and it is finished with one ordinary
sync, which W&B shows as crashed (or as
finished, if the job ended cleanly and only its final request was lost).

After each attempt the outcome decides what follows (see wandbcli): a
transient failure is retried with exponential backoff up to a cap; a
permanent one waits for the next request after a cool-down; a final sync
is retried until it works or fails for good.

A supervisor thread polls live processes and run logs every ``tick``
seconds.  With a :class:`~wandb_offline_sync.state.StateStore`, what the
farm knows is saved after every change that matters (a new run, a final
request, a run done) so a restarted farm carries on.  The clock is
injectable; decisions use it, waiting uses real time.
"""

import collections
import heapq
import logging
import os
import threading
import time

from .errors import FarmBusy
from .wandbcli import NOT_READY, OK, PERMANENT, TRANSIENT

__all__ = ["SyncScheduler", "RunRecord", "LIVE_MODE", "PERIODIC_MODE"]

log = logging.getLogger(__name__)

LIVE_MODE = "live"
PERIODIC_MODE = "periodic"

# States of a run.
QUEUED = "queued"        # waiting for a worker
SYNCING = "syncing"      # an ordinary sync is under way
RETRY = "retry_wait"     # waiting for its backoff to pass
IDLE = "idle"            # waiting for the next request (or live restart)
LIVE = "live"            # a live sync follows the run
DONE = "done"            # the run is complete on W&B
FAILED = "failed"        # stopped retrying; see the last attempt
_BUSY = (QUEUED, SYNCING, RETRY)


class RunRecord:
    """Everything the farm knows about one run."""

    def __init__(self, run_dir, run_id, wandb_file, mode, now):
        self.run_dir = run_dir
        self.run_id = run_id
        self.wandb_file = wandb_file
        self.mode = mode
        self.state = IDLE
        self.final_requested = False
        self.went_quiet = False        # finished by the farm: job went quiet
        self.pending = False           # a request came during a sync
        self.requests = 0
        self.attempts = 0
        self.failures = 0              # failed attempts in a row
        self.last_request = None       # wall clock
        self.last_attempt = None       # wandbcli.Attempt
        self.last_success = None       # wall clock of the last OK attempt
        self.run_url = None            # the run's page on W&B, once known
        self.retry_due = None          # scheduler clock
        self.quiet_until = None        # scheduler clock; after FAILED
        self.finished_at = None        # scheduler clock; DONE or FAILED
        self.final_deadline = None     # scheduler clock; live must end by
        # Liveness, on the scheduler clock.
        self.last_heartbeat = now
        self.last_growth = now
        self.log_size = None           # bytes, at the last look
        self.growth_rate = 0.0         # bytes per second, smoothed
        self.next_watch = now
        self.synced_size = None        # log size at the last OK sync
        # The live sync, when one follows the run.
        self.live = None               # _LiveGroup
        self.live_stop_sent = None     # scheduler clock of SIGTERM
        self.live_restart_due = None   # scheduler clock
        self.live_waiting_since = None  # scheduler clock
        self.live_restarts = 0

    def to_dict(self, now, wall_now):
        def wall(moment):
            if moment is None:
                return None
            return wall_now + (moment - now)

        group = self.live
        live = group.process if group is not None else None
        return {
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "mode": self.mode,
            "state": self.state,
            "final_requested": self.final_requested,
            "went_quiet": self.went_quiet,
            "follow_up_pending": self.pending,
            "requests": self.requests,
            "attempts": self.attempts,
            "failures_in_a_row": self.failures,
            "last_request": self.last_request,
            "last_heartbeat": wall(self.last_heartbeat),
            "last_success": self.last_success,
            "next_retry": wall(self.retry_due) if self.state == RETRY
            else None,
            "run_url": self.run_url,
            "log_size": self.log_size,
            "log_growth_bytes_per_s": round(self.growth_rate, 1),
            "last_log_growth": wall(self.last_growth),
            "live": None if self.mode != LIVE_MODE else {
                "alive": live is not None and live.poll() is None,
                "pid": live.pid if live is not None else None,
                "started": group.started if group is not None else None,
                "runs_in_process": (len(group.members) if group is not None
                                    else 0),
                "restarts": self.live_restarts,
                "error_lines": live.error_lines if live is not None else 0,
                "last_error": live.last_error if live is not None else None,
                "next_restart": wall(self.live_restart_due),
                # wandb's live sync does not report what it sent.
                "bytes_sent": None,
                "rows_sent": None,
            },
            "last_attempt": (self.last_attempt.to_dict()
                             if self.last_attempt else None),
        }

    def to_saved(self):
        """The part of the record that survives a restart."""
        return {
            "run_dir": self.run_dir, "run_id": self.run_id,
            "wandb_file": self.wandb_file, "mode": self.mode,
            "state": self.state if self.state in (DONE, FAILED) else IDLE,
            "final_requested": self.final_requested,
            "went_quiet": self.went_quiet, "requests": self.requests,
            "attempts": self.attempts, "failures": self.failures,
            "last_request": self.last_request,
            "last_success": self.last_success, "run_url": self.run_url,
            "last_attempt": (self.last_attempt.to_dict()
                             if self.last_attempt else None),
        }


class _SavedAttempt:
    """A past attempt read back from the state file."""

    def __init__(self, fields):
        self._fields = dict(fields)
        self.outcome = fields.get("outcome")
        self.reason = fields.get("reason")
        self.run_url = None

    def to_dict(self):
        return dict(self._fields)


class _LiveGroup:
    """One live sync process and the runs it follows."""

    def __init__(self, process, members, started):
        self.process = process         # wandbcli.LiveSync
        self.members = set(members)    # RunRecords not yet done
        self.started = started         # wall clock
        self.stop_sent = None          # scheduler clock of SIGTERM

    def finished(self, record):
        """Whether the live sync finished ``record``'s run.

        wandb writes ``run-<id>.wandb.synced`` when it has sent a run's
        end; one older than this process says nothing.
        """
        try:
            marked = os.stat(record.wandb_file + ".synced").st_mtime
        except (OSError, TypeError):
            return False
        return marked >= self.started - 1.0


class SyncScheduler:
    """Queues, runs, follows and retries syncs for many runs."""

    #: First retry delay in seconds; doubles with each failure in a row.
    backoff_base = 5.0
    #: Longest delay between retries, in seconds.
    backoff_cap = 300.0
    #: Attempts that end transient in a row before a run is given up.
    max_failures = 60
    #: Attempts of a final sync that find the log not ready, in a row,
    #: before the farm settles for what was sent (a crashed job's log may
    #: end in a record that will never be completed).
    max_not_ready_final = 5
    #: Seconds a permanently failed run ignores non-final requests.
    permanent_cooldown = 300.0
    #: Most runs tracked at once; past it, requests for new runs get 503.
    max_runs = 10000
    #: Seconds a done or failed run is remembered before it is forgotten.
    forget_after = 7 * 24 * 3600.0
    #: Seconds without a heartbeat and without log growth after which a
    #: run counts as ended without its final request.
    stale_after = 600.0
    #: Seconds a live sync may take to end after the final request.
    live_grace = 60.0
    #: Live syncs at most at once; runs beyond are synced periodically.
    max_live = 200
    #: Seconds between two looks at a run's transaction log.
    watch_interval = 2.0
    #: Seconds between the supervisor's rounds.
    tick = 0.5
    #: Seconds between SIGTERM and SIGKILL for a live sync.
    kill_grace = 3.0
    #: Runs one live sync process follows at most.  One process costs
    #: about 100 MB, and each run it follows about 0.7 MB more.
    live_group_size = 10
    #: Seconds a run waits for others to share a new live sync with.
    live_group_wait = 3.0
    #: Live sync processes at most (about 100-130 MB each); runs that
    #: find them all taken are synced periodically.
    max_live_processes = 15
    #: Bytes a run's log needs before a live sync may follow it (wandb
    #: writes a 7-byte header first, and a header-only log stalls every
    #: run of the same live sync).
    live_min_log_bytes = 64

    def __init__(self, sync, *, start_live=None, max_workers=5, store=None,
                 clock=time.monotonic, wall_clock=time.time, **settings):
        for name, value in settings.items():
            if not hasattr(type(self), name):
                raise TypeError("unknown scheduler setting %r" % name)
            setattr(self, name, value)
        self._sync = sync              # callable(record) -> Attempt
        self._start_live = start_live  # callable(records) -> LiveSync
        self._store = store
        self._clock = clock
        self._wall = wall_clock
        # Guards every attribute below and every RunRecord.
        self._cond = threading.Condition()
        self._runs = {}
        self._ready = collections.deque()
        self._delayed = []             # heap of (due, sequence, run_dir)
        self._sequence = 0
        self._closing = False
        self._live_count = 0
        self._groups = set()           # _LiveGroup objects running
        self._save_wanted = 0          # generations of state asked for
        self._save_done = 0            # generations written
        if store is not None:
            saved = store.load()
            with self._cond:
                self._restore(saved)
        self._threads = [
            threading.Thread(target=self._work, name="sync-worker-%d" % i,
                             daemon=True)
            for i in range(max_workers)]
        self._threads.append(threading.Thread(
            target=self._supervise_loop, name="sync-supervisor",
            daemon=True))
        if store is not None:
            self._threads.append(threading.Thread(
                target=self._save_loop, name="state-saver", daemon=True))
        for thread in self._threads:
            thread.start()

    @property
    def live(self):
        return self._start_live is not None

    # -- requests ------------------------------------------------------

    def request(self, run_dir, run_id, *, final=False, wandb_file=None):
        """Note a sync request for a run; return the run's state as a dict.

        Raises FarmBusy when the farm tracks ``max_runs`` runs already.
        """
        size = _file_size(wandb_file)
        with self._cond:
            now = self._clock()
            record = self._runs.get(run_dir)
            durable = record is None
            if record is None:
                record = self._add(run_dir, run_id, wandb_file, now)
            record.requests += 1
            record.last_request = self._wall()
            record.last_heartbeat = now
            if run_id:
                record.run_id = run_id
            if record.state == DONE and size is not None and \
                    size != record.synced_size:
                # More was written after the run was complete on W&B
                # (a resumed run): follow it again.
                log.info("run grew after it was done: run=%s", run_id)
                record.state = IDLE
                record.final_requested = record.went_quiet = False
                durable = True
            if final and not record.final_requested:
                record.final_requested = True
                record.final_deadline = now + self.live_grace
                durable = True
            self._dispatch(record, final, size, now)
            answer = record.to_dict(now, self._wall())
            generation = self._want_save() if durable else None
        if generation is not None:
            self._wait_saved(generation)
        return answer

    def _dispatch(self, record, final, size, now):
        """Decide what a request means for a run.  Holds the lock."""
        if record.state == SYNCING:
            record.pending = True
        elif record.state in (QUEUED, RETRY, DONE, LIVE):
            pass    # the sync planned or running serves this request too
        elif record.state == FAILED:
            if final or record.quiet_until is None or \
                    now >= record.quiet_until:
                record.failures = 0
                self._enqueue(record)
        elif record.mode == LIVE_MODE and not record.final_requested:
            self._cond.notify_all()        # the supervisor starts it
        elif record.final_requested or size is None or \
                size != record.synced_size:
            self._enqueue(record)

    def _add(self, run_dir, run_id, wandb_file, now):
        if len(self._runs) >= self.max_runs:
            self._forget_finished(now, everything=True)
        if len(self._runs) >= self.max_runs:
            raise FarmBusy("the farm tracks %d runs already"
                           % len(self._runs))
        mode = PERIODIC_MODE
        if self.live and self._live_count < self.max_live:
            mode = LIVE_MODE
            self._live_count += 1
        record = RunRecord(run_dir, run_id, wandb_file, mode, now)
        self._runs[run_dir] = record
        # The path passed the run directory checks but may still hold
        # newlines or escape sequences: %r keeps them out of the log.
        log.info("new run: run=%s mode=%s dir=%r", run_id, mode, run_dir)
        return record

    def status(self):
        """Every known run, as dicts."""
        with self._cond:
            now = self._clock()
            self._forget_finished(now)
            wall = self._wall()
            return [r.to_dict(now, wall) for r in self._runs.values()]

    def get(self, run_dir):
        with self._cond:
            record = self._runs.get(run_dir)
            return record.to_dict(self._clock(), self._wall()) \
                if record else None

    def wait_idle(self, timeout):
        """Wait until no ordinary sync is queued, running or waiting."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(r.state in _BUSY or r.pending
                      for r in self._runs.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def stop_accepting(self):
        """Stop starting syncs; used before the CLI's processes are ended.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def close(self, timeout=10.0):
        """Stop, let the threads end, and save the state one last time."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            for group in self._groups:
                if group.process.poll() is None:
                    group.process.kill()
        if self._store is not None:
            self._save_now()

    # -- ordinary syncs ------------------------------------------------

    def _enqueue(self, record):
        record.state = QUEUED
        record.retry_due = None
        self._ready.append(record.run_dir)
        self._cond.notify_all()

    def _backoff(self, failures):
        return min(self.backoff_cap,
                   self.backoff_base * 2 ** max(0, failures - 1))

    def _schedule_retry(self, record, now):
        delay = self._backoff(record.failures)
        record.state = RETRY
        record.retry_due = now + delay
        self._sequence += 1
        heapq.heappush(self._delayed,
                       (record.retry_due, self._sequence, record.run_dir))
        self._cond.notify_all()
        return delay

    def _next_record(self):
        """Block until a run is due; None when closing.  Holds the lock."""
        while not self._closing:
            now = self._clock()
            while self._delayed and self._delayed[0][0] <= now:
                due, _, run_dir = heapq.heappop(self._delayed)
                record = self._runs.get(run_dir)
                if record and record.state == RETRY and \
                        record.retry_due == due:
                    record.state = QUEUED
                    self._ready.append(run_dir)
            if self._ready:
                record = self._runs.get(self._ready.popleft())
                if record is not None and record.state == QUEUED:
                    return record
                continue
            wait = None
            if self._delayed:
                wait = max(0.01, self._delayed[0][0] - now)
            self._cond.wait(wait)
        return None

    def _work(self):
        while True:
            with self._cond:
                record = self._next_record()
                if record is None:
                    return
                record.state = SYNCING
                record.pending = False
                final = record.final_requested
            size = _file_size(record.wandb_file)
            try:
                attempt = self._sync(record)
            except Exception:
                log.exception("sync went_quiet: run=%s", record.run_id)
                attempt = None
            with self._cond:
                self._after_attempt(record, attempt, final, size)
                self._cond.notify_all()

    def _after_attempt(self, record, attempt, final, size):
        now = self._clock()
        self._note_attempt(record, attempt)
        outcome = attempt.outcome if attempt else TRANSIENT
        reason = attempt.reason if attempt else "internal error"
        label = "final sync" if final else "sync"

        if outcome == OK:
            record.failures = 0
            record.last_success = self._wall()
            record.synced_size = size
            record.state = DONE if final else IDLE
            log.info("%s done: run=%s", label, record.run_id)
        elif outcome == NOT_READY and not final:
            record.state = IDLE
            log.debug("sync found nothing to send yet: run=%s",
                      record.run_id)
        elif outcome == NOT_READY and (
                record.went_quiet or
                record.failures + 1 >= self.max_not_ready_final):
            # A job killed mid-write leaves a log that ends in half a
            # record for ever; wandb has sent every complete one.
            record.failures = 0
            record.last_success = self._wall()
            record.synced_size = size
            record.state = DONE
            log.warning("final sync settled for the complete records: "
                        "run=%s reason=%s", record.run_id, reason)
        elif outcome == PERMANENT:
            record.failures += 1
            self._fail(record, now)
            log.error("%s failed for good: run=%s reason=%s", label,
                      record.run_id, reason)
        else:
            record.failures += 1
            if record.failures >= self.max_failures:
                self._fail(record, now)
                log.error("%s given up after %d failures: run=%s "
                          "reason=%s", label, record.failures,
                          record.run_id, reason)
            else:
                delay = self._schedule_retry(record, now)
                log.warning("%s failed, retry in %.0fs: run=%s reason=%s",
                            label, delay, record.run_id, reason)

        if record.state == DONE:
            record.finished_at = now
        if record.pending and (
                record.state == IDLE or
                (record.state in (DONE, FAILED) and
                 record.final_requested and not final)):
            # Requests came during the attempt: one follow-up serves them
            # all.  A final request that came during a mid-run attempt
            # deserves its own attempt even if that one failed.
            self._enqueue(record)
        record.pending = False
        self._want_save()

    def _note_attempt(self, record, attempt):
        record.attempts += 1
        record.last_attempt = attempt
        if attempt is not None and attempt.run_url:
            record.run_url = attempt.run_url

    def _fail(self, record, now):
        record.state = FAILED
        record.quiet_until = now + self.permanent_cooldown
        record.finished_at = now

    # -- the supervisor ------------------------------------------------

    def _supervise_loop(self):
        with self._cond:
            while not self._closing:
                now = self._clock()
                waiting = []
                for record in list(self._runs.values()):
                    try:
                        if self._supervise(record, now):
                            waiting.append(record)
                    except Exception:
                        log.exception("supervising run=%s failed",
                                      record.run_id)
                for group in list(self._groups):
                    try:
                        self._supervise_group(group, now)
                    except Exception:
                        log.exception("supervising live sync pid=%d "
                                      "failed", group.process.pid)
                if waiting:
                    self._launch_groups(waiting, now)
                self._cond.wait(self.tick)

    def _supervise(self, record, now):
        """One look at one run; True if it waits for a live sync.

        Holds the lock.
        """
        if record.state in (DONE, FAILED) and record.live is None:
            return False
        if now >= record.next_watch:
            self._watch_log(record, now)
        if record.live is not None:
            if record.live_stop_sent is None and (
                    self._is_stale(record, now) or
                    self._past_final_grace(record, now)):
                if not record.final_requested:
                    self._finish_quiet_run(record)
                else:
                    log.warning("live sync did not end %.0fs after the "
                                "final request; stopping it: run=%s",
                                self.live_grace, record.run_id)
                self._stop_group(record.live, now)
            return False
        if record.state != IDLE or record.final_requested:
            return False
        if self._is_stale(record, now):
            self._finish_quiet_run(record)
            self._enqueue(record)
            return False
        return (record.mode == LIVE_MODE and record.requests and
                (record.live_restart_due is None or
                 now >= record.live_restart_due) and
                # A log that holds only its header would hold up every
                # run in the same live sync until it is written.
                (record.log_size or 0) >= self.live_min_log_bytes)

    def _watch_log(self, record, now):
        record.next_watch = now + self.watch_interval
        size = _file_size(record.wandb_file)
        if size is None:
            return
        if record.log_size is not None and size != record.log_size:
            elapsed = max(now - record.last_growth, 1e-3)
            rate = max(0, size - record.log_size) / elapsed
            record.growth_rate = 0.5 * record.growth_rate + 0.5 * rate
            record.last_growth = now
        elif now - record.last_growth > 2 * self.watch_interval:
            record.growth_rate = 0.0
        record.log_size = size

    def _is_stale(self, record, now):
        quiet_since = max(record.last_heartbeat, record.last_growth)
        return now - quiet_since >= self.stale_after

    def _finish_quiet_run(self, record):
        record.went_quiet = True
        record.final_requested = True
        log.warning("no heartbeat and no new data for %.0fs; finishing the "
                    "run: run=%s", self.stale_after, record.run_id)
        self._want_save()

    def _past_final_grace(self, record, now):
        return (record.final_requested and
                record.final_deadline is not None and
                now >= record.final_deadline)

    def _launch_groups(self, waiting, now):
        """Start live syncs for runs that wait: full groups at once, the
        rest once the longest-waiting of them has waited long enough."""
        for record in waiting:
            if record.live_waiting_since is None:
                record.live_waiting_since = now
        waiting.sort(key=lambda r: r.live_waiting_since)
        size = self.live_group_size
        for first in range(0, len(waiting), size):
            members = waiting[first:first + size]
            if len(members) < size and \
                    now - members[0].live_waiting_since < \
                    self.live_group_wait:
                return      # a few more may come and share the process
            if len(self._groups) >= self.max_live_processes:
                self._go_periodic(members)
                continue
            self._launch_group(members, now)

    def _go_periodic(self, records):
        """Sync runs periodically: the farm runs all the live syncs its
        memory allows.  Runs that arrive more than ``live_group_wait``
        apart get a process each, so this bounds memory when they
        trickle in.  TODO: merging small live syncs (one restart, one
        re-send) would keep such runs live."""
        for record in records:
            record.mode = PERIODIC_MODE
            record.live_waiting_since = None
            self._live_count -= 1
            log.warning("%d live syncs run already; syncing periodically: "
                        "run=%s", self.max_live_processes, record.run_id)
            self._enqueue(record)

    def _launch_group(self, members, now):
        try:
            process = self._start_live(members)
        except Exception as exc:
            for record in members:
                record.failures += 1
                record.live_restart_due = now + self._backoff(
                    record.failures)
                record.live_waiting_since = None
            log.error("cannot start live sync: runs=%s error=%s",
                      ",".join(str(r.run_id) for r in members), exc)
            return
        group = _LiveGroup(process, members, self._wall())
        self._groups.add(group)
        for record in members:
            record.live = group
            record.state = LIVE
            record.live_stop_sent = None
            record.live_waiting_since = None
        log.info("live sync started: pid=%d runs=%s", process.pid,
                 ",".join(str(r.run_id) for r in members))

    def _supervise_group(self, group, now):
        process = group.process
        process.read_new_lines()
        if process.poll() is not None:
            self._group_ended(group, now)
            return
        if group.stop_sent is not None:
            if now - group.stop_sent >= self.kill_grace:
                process.kill()
            return
        for record in list(group.members):
            url = process.run_urls.get(record.run_id)
            if url:
                record.run_url = url
            if not group.finished(record):
                continue
            if process.error_lines:
                # wandb marks a run synced even when it lost some of its
                # data on the way; an ordinary sync sends it all again.
                group.members.discard(record)
                record.live = None
                record.final_requested = True
                log.info("live sync reported errors; finishing the run "
                         "with an ordinary sync: run=%s", record.run_id)
                self._enqueue(record)
                self._want_save()
            else:
                self._live_member_done(group, record, now)

    def _stop_group(self, group, now):
        group.process.terminate()
        group.stop_sent = now
        for record in group.members:
            record.live_stop_sent = now

    def _live_member_done(self, group, record, now):
        group.members.discard(record)
        record.live = None
        record.live_stop_sent = None
        record.failures = 0
        record.last_success = self._wall()
        record.synced_size = _file_size(record.wandb_file)
        record.state = DONE
        record.finished_at = now
        log.info("live sync followed the run to its end: run=%s",
                 record.run_id)
        self._want_save()

    def _group_ended(self, group, now):
        attempt = group.process.finish()
        self._groups.discard(group)
        stopped = group.stop_sent is not None
        for record in list(group.members):
            self._note_attempt(record, attempt)
            url = group.process.run_urls.get(record.run_id)
            if url:
                record.run_url = url
            if attempt.outcome == OK and (group.finished(record) or
                                          not stopped):
                self._live_member_done(group, record, now)
                continue
            if group.finished(record):
                record.final_requested = True   # ended, maybe with gaps
            record.live = None
            record.live_stop_sent = None
            if record.final_requested:
                log.info("finishing the run with an ordinary sync: run=%s",
                         record.run_id)
                self._enqueue(record)
            elif stopped:
                # Stopped because of another run in the same process:
                # back in line for a new live sync at once.
                record.state = IDLE
                record.live_restarts += 1
            else:
                record.failures += 1
                record.live_restarts += 1
                record.state = IDLE
                delay = self._backoff(record.failures)
                record.live_restart_due = now + delay
                log.warning("live sync ended early, restart in %.0fs: "
                            "run=%s reason=%s", delay, record.run_id,
                            attempt.reason)
        group.members.clear()
        self._want_save()

    # -- forgetting and remembering ------------------------------------

    def _forget_finished(self, now, everything=False):
        for run_dir, record in list(self._runs.items()):
            if record.state not in (DONE, FAILED) or record.live:
                continue
            if everything or now - record.finished_at >= self.forget_after:
                del self._runs[run_dir]
                if record.mode == LIVE_MODE:
                    self._live_count -= 1

    def _restore(self, saved_runs):
        now = self._clock()
        for saved in saved_runs:
            try:
                record = RunRecord(saved["run_dir"], saved.get("run_id"),
                                   saved.get("wandb_file"),
                                   saved.get("mode", PERIODIC_MODE), now)
            except (KeyError, TypeError):
                continue
            if record.mode == LIVE_MODE and not self.live:
                record.mode = PERIODIC_MODE
            for name in ("final_requested", "went_quiet", "requests",
                         "attempts", "failures", "last_request",
                         "last_success", "run_url"):
                if name in saved:
                    setattr(record, name, saved[name])
            if isinstance(saved.get("last_attempt"), dict):
                record.last_attempt = _SavedAttempt(saved["last_attempt"])
            self._runs[record.run_dir] = record
            if record.mode == LIVE_MODE:
                self._live_count += 1
            state = saved.get("state")
            if state in (DONE, FAILED):
                record.state = state
                record.finished_at = now
                record.synced_size = _file_size(record.wandb_file)
            elif record.final_requested or record.mode == PERIODIC_MODE:
                self._enqueue(record)
            # Live runs still being written: the supervisor restarts
            # their live sync; the stale check finishes dead ones.
        if saved_runs:
            log.info("restored %d runs from the state file",
                     len(self._runs))

    def _want_save(self):
        """Ask the saver for a write; return its generation.  Holds lock."""
        if self._store is None:
            return None
        self._save_wanted += 1
        self._cond.notify_all()
        return self._save_wanted

    def _wait_saved(self, generation, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._save_done < generation and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("state not saved within %.0fs", timeout)
                    return
                self._cond.wait(left)

    def _save_loop(self):
        while True:
            with self._cond:
                while self._save_done >= self._save_wanted and \
                        not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
            self._save_now()

    def _save_now(self):
        with self._cond:
            generation = self._save_wanted
            saved = [r.to_saved() for r in self._runs.values()]
        try:
            self._store.save(saved)
        except OSError as exc:
            log.error("cannot save state to %s: %s", self._store.path, exc)
        with self._cond:
            self._save_done = max(self._save_done, generation)
            self._cond.notify_all()


def _file_size(path):
    try:
        return os.stat(path).st_size
    except (OSError, TypeError, ValueError):
        return None
