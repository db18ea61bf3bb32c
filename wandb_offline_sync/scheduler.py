"""When each run is synced: one sync per run at a time, retries, a pool.

The scheduler keeps a :class:`RunRecord` per run directory.  A request for a
run that is idle queues a sync; requests that arrive while its sync runs
collapse into exactly one follow-up.  ``max_workers`` threads take queued
runs, so at most that many syncs run at once across all runs.

After each attempt the outcome decides what follows (see wandbcli for the
outcomes): a transient failure is retried with exponential backoff up to a
cap; a permanent one stops until the next request after a cool-down; a
final sync is retried until it works or fails for good.  The clock is
injectable; decisions use it, waiting uses real time.
"""

import collections
import heapq
import logging
import threading
import time

from .errors import FarmBusy
from .wandbcli import NOT_READY, OK, PERMANENT, TRANSIENT

__all__ = ["SyncScheduler", "RunRecord"]

log = logging.getLogger(__name__)

# States of a run.
QUEUED = "queued"        # waiting for a worker
SYNCING = "syncing"      # an attempt is under way
RETRY = "retry_wait"     # waiting for its backoff to pass
IDLE = "idle"            # synced; waiting for the next request
DONE = "done"            # final sync succeeded
FAILED = "failed"        # stopped retrying; see the last attempt


class RunRecord:
    """Everything the farm knows about one run."""

    def __init__(self, run_dir, run_id, wandb_file=None):
        self.run_dir = run_dir
        self.run_id = run_id
        self.wandb_file = wandb_file
        self.state = IDLE
        self.final_requested = False
        self.pending = False           # a request came during a sync
        self.requests = 0
        self.attempts = 0
        self.failures = 0              # failed attempts in a row
        self.last_request = None       # wall clock
        self.last_attempt = None       # wandbcli.Attempt
        self.last_success = None       # wall clock of the last OK attempt
        self.retry_due = None          # scheduler clock
        self.quiet_until = None        # scheduler clock; after FAILED
        self.finished_at = None        # scheduler clock; DONE or FAILED
        self.run_url = None            # the run's page on W&B, once known

    def to_dict(self, now, wall_now):
        retry = None
        if self.state == RETRY and self.retry_due is not None:
            retry = wall_now + max(0.0, self.retry_due - now)
        return {
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "state": self.state,
            "final_requested": self.final_requested,
            "follow_up_pending": self.pending,
            "requests": self.requests,
            "attempts": self.attempts,
            "failures_in_a_row": self.failures,
            "last_request": self.last_request,
            "last_success": self.last_success,
            "next_retry": retry,
            "run_url": self.run_url,
            "last_attempt": (self.last_attempt.to_dict()
                             if self.last_attempt else None),
        }


class SyncScheduler:
    """Queues, runs and retries syncs for many runs."""

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

    def __init__(self, sync, *, max_workers=5, clock=time.monotonic,
                 wall_clock=time.time, **settings):
        for name, value in settings.items():
            if not hasattr(type(self), name):
                raise TypeError("unknown scheduler setting %r" % name)
            setattr(self, name, value)
        self._sync = sync              # callable(record) -> Attempt
        self._clock = clock
        self._wall = wall_clock
        # Guards _runs, _ready, _delayed, _closing and every RunRecord.
        self._cond = threading.Condition()
        self._runs = {}
        self._ready = collections.deque()
        self._delayed = []             # heap of (due, sequence, run_dir)
        self._sequence = 0
        self._closing = False
        self._workers = [
            threading.Thread(target=self._work, name="sync-worker-%d" % i,
                             daemon=True)
            for i in range(max_workers)]
        for worker in self._workers:
            worker.start()

    # -- requests ------------------------------------------------------

    def request(self, run_dir, run_id, *, final=False, wandb_file=None):
        """Note a sync request for a run; return the run's state as a dict.

        Raises FarmBusy when the farm tracks ``max_runs`` runs already.
        """
        with self._cond:
            now = self._clock()
            record = self._runs.get(run_dir)
            if record is None:
                record = self._add(run_dir, run_id, wandb_file, now)
            record.requests += 1
            record.last_request = self._wall()
            if run_id:
                record.run_id = run_id
            if final:
                record.final_requested = True

            if record.state == SYNCING:
                record.pending = True
            elif record.state in (IDLE, DONE):
                self._enqueue(record)
            elif record.state == FAILED:
                if final or record.quiet_until is None or \
                        now >= record.quiet_until:
                    record.failures = 0
                    self._enqueue(record)
            # QUEUED and RETRY: the sync already planned serves this too.
            return record.to_dict(now, self._wall())

    def _add(self, run_dir, run_id, wandb_file, now):
        if len(self._runs) >= self.max_runs:
            self._forget_finished(now, everything=True)
        if len(self._runs) >= self.max_runs:
            raise FarmBusy("the farm tracks %d runs already"
                           % len(self._runs))
        record = RunRecord(run_dir, run_id, wandb_file)
        self._runs[run_dir] = record
        log.info("new run: run=%s dir=%s", run_id, run_dir)
        return record

    def status(self):
        """Every known run, as dicts, oldest request first."""
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
        """Wait until no run is queued, syncing or waiting to retry."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(r.state in (QUEUED, SYNCING, RETRY) or r.pending
                      for r in self._runs.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout=10.0):
        """Stop taking work and let the workers end."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    # -- workers -------------------------------------------------------

    def _enqueue(self, record):
        record.state = QUEUED
        record.retry_due = None
        self._ready.append(record.run_dir)
        self._cond.notify()

    def _schedule_retry(self, record, now):
        delay = min(self.backoff_cap,
                    self.backoff_base * 2 ** max(0, record.failures - 1))
        record.state = RETRY
        record.retry_due = now + delay
        self._sequence += 1
        heapq.heappush(self._delayed,
                       (record.retry_due, self._sequence, record.run_dir))
        self._cond.notify()
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
            try:
                attempt = self._sync(record)
            except Exception:
                log.exception("sync crashed: run=%s", record.run_id)
                attempt = None
            with self._cond:
                self._after_attempt(record, attempt, final)
                self._cond.notify_all()

    def _after_attempt(self, record, attempt, final):
        now = self._clock()
        record.attempts += 1
        record.last_attempt = attempt
        if attempt is not None and attempt.run_url:
            record.run_url = attempt.run_url
        outcome = attempt.outcome if attempt else TRANSIENT
        reason = attempt.reason if attempt else "internal error"
        label = "final sync" if final else "sync"

        if outcome == OK:
            record.failures = 0
            record.last_success = self._wall()
            record.state = DONE if final else IDLE
            log.info("%s done: run=%s", label, record.run_id)
        elif outcome == NOT_READY and not final:
            record.state = IDLE
            log.debug("sync found nothing to send yet: run=%s",
                      record.run_id)
        elif outcome == PERMANENT or (
                outcome == NOT_READY and
                record.failures + 1 >= self.max_not_ready_final):
            record.failures += 1
            record.state = FAILED
            record.quiet_until = now + self.permanent_cooldown
            log.error("%s failed for good: run=%s reason=%s", label,
                      record.run_id, reason)
        else:
            record.failures += 1
            if record.failures >= self.max_failures:
                record.state = FAILED
                record.quiet_until = now + self.permanent_cooldown
                log.error("%s given up after %d failures: run=%s "
                          "reason=%s", label, record.failures,
                          record.run_id, reason)
            else:
                delay = self._schedule_retry(record, now)
                log.warning("%s failed, retry in %.0fs: run=%s reason=%s",
                            label, delay, record.run_id, reason)

        if record.state in (DONE, FAILED):
            record.finished_at = now
        if record.pending and record.state in (IDLE, DONE):
            self._enqueue(record)
        elif record.pending and record.state == FAILED and \
                record.final_requested and not final:
            # The final request arrived while a mid-run sync failed for
            # good; the final one still deserves its own attempt.
            self._enqueue(record)
        record.pending = False

    def _forget_finished(self, now, everything=False):
        for run_dir, record in list(self._runs.items()):
            if record.state not in (DONE, FAILED):
                continue
            if everything or now - record.finished_at >= self.forget_after:
                del self._runs[run_dir]
