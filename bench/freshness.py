"""How fresh a run is on W&B while it trains, and what that costs in bytes.

A training job logs at a steady rate (``STEPS_PER_SECOND``), each row
carrying the wall-clock time of its ``run.log()`` call as ``t_logged``.
It runs the real agent (``agent.init(frequency=2)``) against a farm
started in this process, which runs the real ``wandb`` CLI against the
fake W&B server of the test suite (``tests/fake_wandb.py``); nothing
leaves 127.0.0.1.  The fake server notes the time each history row
arrives.  Each variant gets a fresh fake server, farm and job, one after
the other:

1. live mode (``wandb beta sync --live``, the farm's default live
   interval), with ``WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=1`` in the
   job;
2. periodic mode (one ``wandb sync`` per request), same job;
3. live mode without setting the flush interval (wandb's 15 s), shorter:
   what users get who skip that line of the README.  Left out with
   ``--quick``.

For each variant it prints:

- the delay from ``run.log()`` to the FIRST arrival of that step at the
  server (periodic syncs re-send the whole history, so a step arrives
  many times), as p50, p95 and max;
- the steps logged and the steps that arrived;
- the history bytes received, divided by the history bytes of ONE full
  upload of the finished run.  That is measured, not computed: a copy of
  the finished run directory is synced once with plain
  ``wandb sync --include-synced`` against another fresh fake server;
- the ``complete``/``exitcode`` states the run was shown with while the
  job ran: a mid-run ``wandb sync`` reports the run as ended with exit
  code 1 (failed on W&B) until the next sync.

Targets, printed next to the figures: live p95 at most 5 s, and live
bytes at most 1.2 times one full upload.  The exit status is 0 whatever
the verdicts; it is 1 only when a variant could not be measured (the job
or a sync failed), with one line saying why.

The fake server answers at once and sits on loopback, so the figures are
the pipeline's own delays (the job's flush interval, the agent's request
frequency, the live sync's send interval, the CLI's start-up) without a
real network's.  The machine is shared and has few cores: another busy
process moves the figures from run to run, the periodic ones most, since
each of its syncs competes with the job for the cores.  Every wait is
bounded; temporary directories and every process started here are
removed at the end.

Usage: python bench/freshness.py [--quick] [--seconds N]
"""

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)                       # run from a checkout
sys.path.insert(0, os.path.join(REPO, "tests"))

from wandb_offline_sync import protocol  # noqa: E402
from wandb_offline_sync.certs import make_certificate  # noqa: E402
from wandb_offline_sync.farm import DEFAULT_LIVE_INTERVAL, Farm  # noqa: E402
from wandb_offline_sync.rundirs import RunDirPolicy  # noqa: E402
from wandb_offline_sync.scheduler import SyncScheduler  # noqa: E402
from wandb_offline_sync.server import make_server_context  # noqa: E402
from wandb_offline_sync.wandbcli import OK, WandbCli  # noqa: E402

from fake_wandb import API_KEY, FAST_FAILURE, FakeWandbServer, \
    isolated_environ  # noqa: E402

#: Ceiling on the live p95 delay from run.log() to W&B, in seconds.
TARGET_LIVE_P95 = 5.0
#: Ceiling on live history bytes / one full upload's.
TARGET_LIVE_BYTES_RATIO = 1.2

#: Rows the job logs per second, evenly spaced.
STEPS_PER_SECOND = 5
#: The agent's least seconds between two sync requests.
AGENT_FREQUENCY = 2
#: WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL in the job, in seconds.
FLUSH_INTERVAL = 1
#: wandb's own flush interval, used when the variable is not set.
WANDB_DEFAULT_FLUSH_INTERVAL = 15
#: Job length of the full run, in seconds (--seconds overrides).
FULL_SECONDS = 60.0
#: Job length with --quick, in seconds.
QUICK_SECONDS = 4.0
#: Longest job length of the default-flush variant, in seconds.
DEFAULT_FLUSH_SECONDS = 40.0

#: Seconds the job may take beyond its logging time (wandb start-up,
#: finish, the agent's final request).
JOB_SLACK = 120.0
#: Seconds to wait for the farm to finish a run after its job ended.
FINISH_TIMEOUT = 120.0
#: Seconds one sync (the reference upload, a periodic sync) may take.
SYNC_TIMEOUT = 120.0

USERNAME = "bench"
PASSWORD = "freshness bench password"
#: Most syncs the farm runs at once.
SYNC_THREADS = 2
# The wandb CLI beside this Python, as the farm would be installed.
WANDB = os.path.join(os.path.dirname(sys.executable), "wandb")
if not os.path.exists(WANDB):
    WANDB = shutil.which("wandb") or "wandb"

# The job: logs at a steady rate for `seconds`, each row with the wall
# clock of its run.log() call.  Steps are spaced from one start time, so
# a slow run.log() does not slow the rate down.  Prints its run directory
# first, and at the end the number of steps and the wall clock of the
# first and the last run.log(), as JSON lines.
JOB = textwrap.dedent("""
    import json, os, sys, time
    import wandb
    from wandb_offline_sync import agent

    seconds, rate, frequency = map(float, sys.argv[1:4])
    run = wandb.init(project="freshness")
    print(json.dumps({"run_id": run.id,
                      "run_dir": os.path.dirname(run.dir)}), flush=True)
    if agent.init(frequency=frequency) is None:
        sys.exit("the agent did not start")
    period = 1.0 / rate
    start = time.monotonic()
    first_log = None
    step = 0
    while step * period < seconds:
        pause = start + step * period - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        now = time.time()
        run.log({"t_logged": now, "loss": 1.0 / (step + 1)})
        agent.trigger_sync()
        first_log = first_log or now
        step += 1
    last_log = now
    run.finish()
    print(json.dumps({"steps": step, "first_log": first_log,
                      "last_log": last_log}), flush=True)
""")


class BenchError(Exception):
    """A variant could not be measured."""


class Variant:
    """One farm mode and job setting to measure."""

    def __init__(self, label, *, live, flush_interval, seconds):
        self.label = label
        self.live = live
        self.flush_interval = flush_interval    # None: wandb's default
        self.seconds = seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short jobs and no default-flush variant, "
                             "for a smoke test")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds each job logs (default: %.0f, "
                             "%.0f with --quick)"
                             % (FULL_SECONDS, QUICK_SECONDS))
    parser.add_argument("--live-interval", type=float,
                        default=DEFAULT_LIVE_INTERVAL,
                        help="the farm's live send interval in whole "
                             "seconds (default: %(default)s, the farm's)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (QUICK_SECONDS if args.quick
                               else FULL_SECONDS)
    if not 0 < seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]")
    variants = [
        Variant("live", live=True, flush_interval=FLUSH_INTERVAL,
                seconds=seconds),
        Variant("periodic", live=False, flush_interval=FLUSH_INTERVAL,
                seconds=seconds),
    ]
    if not args.quick:
        variants.append(Variant(
            "live, default flush", live=True, flush_interval=None,
            seconds=min(seconds, DEFAULT_FLUSH_SECONDS)))

    # SIGTERM unwinds like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    began = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="freshness-")
    try:
        cert, key = os.path.join(scratch, "cert.pem"), \
            os.path.join(scratch, "key.pem")
        make_certificate(cert, key, ["127.0.0.1", "localhost"], days=1)
        wandb_version = WandbCli(
            [WANDB], work_root=os.path.join(scratch, "version")).version()
        results = []
        for number, variant in enumerate(variants):
            print("measuring %s: %.0f s job ..." % (variant.label,
                                                   variant.seconds),
                  file=sys.stderr, flush=True)
            folder = os.path.join(scratch, "variant-%d" % number)
            os.makedirs(folder)
            results.append(measure(variant, folder, (cert, key),
                                   args.live_interval))
    except BenchError as exc:
        print("freshness: error: %s" % exc, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(results, wandb_version, args.live_interval,
           time.monotonic() - began)
    return 0


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


# -- one variant -------------------------------------------------------

def measure(variant, folder, certificate, live_interval):
    """Run one job against a fresh farm and fake server; return a dict."""
    with FakeWandbServer() as fake:
        farm = start_farm(fake, folder, certificate, variant.live,
                          live_interval)
        try:
            job = run_job(variant, folder, farm, certificate[0])
            run_id = job["run_id"]
            record = wait_finished(farm, fake, run_id)
        finally:
            farm.close()
        arrivals = fake.history_arrivals(run_id)
        received = fake.history_bytes(run_id)
        states = fake.state_arrivals(run_id)
    if not arrivals:
        raise BenchError("%s: no history row reached the server"
                         % variant.label)
    reference = full_upload(job["run_dir"], run_id, folder)

    result = {"variant": variant, "job": job,
              "record": record, "received_bytes": received,
              "reference": reference, "states": states_while_running(
                  states, arrivals, job["first_log"], job["last_log"])}
    result.update(first_arrivals(arrivals, job["first_log"]))
    return result


def start_farm(fake, folder, certificate, live, live_interval):
    """A farm on 127.0.0.1 port 0 whose wandb CLI talks to ``fake``."""
    environ = farm_environ(fake, os.path.join(folder, "farm-env"))
    cli = WandbCli([WANDB], timeout=SYNC_TIMEOUT,
                   work_root=os.path.join(folder, "farm-work"),
                   environ=environ)
    policy = RunDirPolicy(allow_roots=[folder])
    return Farm(("127.0.0.1", 0),
                ssl_context=make_server_context(*certificate),
                username=USERNAME, password=PASSWORD, policy=policy,
                cli=cli, num_threads=SYNC_THREADS, live=live,
                live_interval=live_interval).start()


def farm_environ(fake, root):
    environ = isolated_environ(root)
    del environ["WANDB_MODE"]
    environ.update(FAST_FAILURE, WANDB_BASE_URL=fake.url,
                   WANDB_API_KEY=API_KEY)
    return environ


def run_job(variant, folder, farm, cert):
    """Run the training job to its end; return what it said and when."""
    environ = isolated_environ(os.path.join(folder, "job"))
    environ.update({
        "PYTHONPATH": REPO,
        protocol.ENV_HOST: "127.0.0.1",
        protocol.ENV_PORT: str(farm.port),
        protocol.ENV_USERNAME: USERNAME,
        protocol.ENV_PASSWORD: PASSWORD,
        protocol.ENV_CERT: cert,
    })
    if variant.flush_interval is not None:
        environ["WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL"] = str(
            variant.flush_interval)
    stderr_path = os.path.join(folder, "job-stderr.txt")
    argv = [sys.executable, "-c", JOB, str(variant.seconds),
            str(STEPS_PER_SECOND), str(AGENT_FREQUENCY)]

    with open(stderr_path, "wb") as stderr:
        # A session of its own, so that wandb's service process goes
        # with the job if the job has to be killed.
        job = subprocess.Popen(argv, env=environ, cwd=folder,
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=stderr,
                               start_new_session=True)
        try:
            out, _ = job.communicate(timeout=variant.seconds + JOB_SLACK)
        except subprocess.TimeoutExpired:
            out = b""
        finally:
            _kill_group(job)
    said = {}
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith("{"):
            said.update(json.loads(line))
    if job.returncode != 0 or "steps" not in said:
        with open(stderr_path, "rb") as f:
            tail = f.read().decode("utf-8", "replace").strip()[-600:]
        raise BenchError("%s: the job failed (exit %s): %s"
                         % (variant.label, job.returncode, tail))
    return said


def _kill_group(job):
    """End whatever is left of the job's process group."""
    if job.poll() is None:
        job.kill()
    job.wait()
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_finished(farm, fake, run_id):
    """Wait until the farm has finished the run; return its record."""
    deadline = time.monotonic() + FINISH_TIMEOUT

    def record():
        runs = farm.scheduler.status()
        return runs[0] if runs else None

    while time.monotonic() < deadline:
        current = record()
        if current and current["state"] in ("done", "failed"):
            break
        time.sleep(0.2)
    current = record()
    final = fake.final_state(run_id)
    if not current or current["state"] != "done" or \
            final != {"complete": True, "exitcode": 0}:
        raise BenchError(
            "the farm did not finish run %s within %.0f s of the job's "
            "end: state=%s, last state on W&B=%s, last attempt=%s"
            % (run_id, FINISH_TIMEOUT, current and current["state"], final,
               current and current["last_attempt"]))
    return current


def full_upload(run_dir, run_id, folder):
    """One plain sync of a copy of the finished run to a fresh server."""
    copy = os.path.join(folder, "reference", os.path.basename(run_dir))
    shutil.copytree(run_dir, copy)
    with FakeWandbServer() as fake:
        cli = WandbCli([WANDB], timeout=SYNC_TIMEOUT,
                       work_root=os.path.join(folder, "reference-work"),
                       environ=farm_environ(
                           fake, os.path.join(folder, "reference-env")))
        try:
            attempt = cli.sync(copy)
        finally:
            cli.close()
        steps = fake.history_steps(run_id)
        if attempt.outcome != OK or not steps:
            raise BenchError("the reference upload of run %s failed: %s"
                             % (run_id, attempt.reason))
        return {"bytes": fake.history_bytes(run_id), "rows": len(steps),
                "unique": len(set(steps)),
                "seconds": attempt.ended - attempt.started}


# -- figures -----------------------------------------------------------

def first_arrivals(arrivals, first_log):
    """Delays from run.log() to each step's first arrival, and counts."""
    first = {}
    logged_at = {}
    for when, row in arrivals:
        step = row.get("_step")
        if step is None or "t_logged" not in row:
            continue
        if step not in first or when < first[step]:
            first[step] = when
            logged_at[step] = row["t_logged"]
    delays = sorted(first[step] - logged_at[step] for step in first)
    return {"delays": delays, "arrived": len(first),
            "rows_received": len(arrivals),
            "first_row_after": (min(first.values()) - first_log
                                if first else None)}


def states_while_running(states, arrivals, first_log, last_log):
    """The run's states posted while the job logged, and how long it was
    shown as ended (``complete``) with a nonzero exit code.

    The fake server keeps only the posts that carry a state, so the end
    of a "failed" stretch is bounded two ways: the next sync's first
    rows (each ``wandb sync`` re-sends from the first step; W&B most
    likely shows the run as running again once posts come in) and the
    next state post.
    """
    during = [(when, state) for when, state in states
              if first_log <= when < last_log]
    first_step = min(row.get("_step", 0) for _, row in arrivals)
    sends = sorted(when for when, row in arrivals
                   if row.get("_step") == first_step)
    to_next_send = to_next_state = 0.0
    failed_posts = 0
    for index, (when, state) in enumerate(during):
        if not (state.get("complete") and state.get("exitcode")):
            continue
        failed_posts += 1
        next_state = during[index + 1][0] if index + 1 < len(during) \
            else last_log
        next_send = min([moment for moment in sends if moment > when],
                        default=last_log)
        to_next_state += next_state - when
        to_next_send += min(next_send, next_state) - when
    return {"posts": len(during), "failed_posts": failed_posts,
            "failed_to_next_send": to_next_send,
            "failed_to_next_state": to_next_state,
            "logging_seconds": last_log - first_log,
            "final": states[-1][1] if states else None,
            "final_after": (states[-1][0] - last_log if states else None)}


def percentile(values, fraction):
    """Nearest-rank percentile: the value ``fraction`` of ``values`` are
    at or below."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


# -- reporting ---------------------------------------------------------

def report(results, wandb_version, live_interval, elapsed):
    print("wandb-offline-sync freshness: %s, python %s, %d cpus"
          % (wandb_version, platform.python_version(), os.cpu_count()))
    print("job: %d steps/s, agent.init(frequency=%d), "
          "WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=%d (unset where the "
          "flush column says %ds)"
          % (STEPS_PER_SECOND, AGENT_FREQUENCY, FLUSH_INTERVAL,
             WANDB_DEFAULT_FLUSH_INTERVAL))
    print("farm: live interval %g s, %d sync threads, supervisor tick "
          "%g s, log watch %g s"
          % (live_interval, SYNC_THREADS, SyncScheduler.tick,
             SyncScheduler.watch_interval))
    print("delay: run.log() to the step's first arrival at the fake W&B "
          "server, seconds")
    print("bytes: history bytes received / one full upload's")
    print()
    print("%-22s %5s %5s %5s %5s %6s %8s %6s %7s"
          % ("variant", "flush", "job s", "p50", "p95", "max",
             "logged", "arrived", "bytes"))
    for result in results:
        variant = result["variant"]
        delays = result["delays"]
        print("%-22s %4ss %5.0f %5.1f %5.1f %6.1f %8d %6d %6.2fx"
              % (variant.label, variant.flush_interval or
                 WANDB_DEFAULT_FLUSH_INTERVAL, variant.seconds,
                 percentile(delays, 0.5), percentile(delays, 0.95),
                 delays[-1], result["job"]["steps"], result["arrived"],
                 bytes_ratio(result)))
    print()
    for result in results:
        report_details(result)
    live = results[0]
    p95 = percentile(live["delays"], 0.95)
    ratio = bytes_ratio(live)
    print("live p95 %.1f s <= %.0f s: %s" % (
        p95, TARGET_LIVE_P95, verdict(p95 <= TARGET_LIVE_P95)))
    print("live bytes %.2fx <= %.1fx: %s" % (
        ratio, TARGET_LIVE_BYTES_RATIO,
        verdict(ratio <= TARGET_LIVE_BYTES_RATIO)))
    print("Took %.0f s." % elapsed)


def report_details(result):
    variant = result["variant"]
    record = result["record"]
    reference = result["reference"]
    states = result["states"]
    print("%s:" % variant.label)
    print("  first row on the server %.1f s after the first run.log()"
          % result["first_row_after"])
    if variant.live:
        restarts = (record["live"] or {}).get("restarts", 0)
        # Each live sync that ended counts as an attempt.
        print("  live syncs restarted: %d; ordinary syncs: %d"
              % (restarts, record["attempts"] - restarts - 1))
    else:
        print("  wandb sync runs: %d for %d requests"
              % (record["attempts"], record["requests"]))
    print("  history received: %d bytes in %d rows; one full upload: %d "
          "bytes in %d rows (%d steps), took %.1f s"
          % (result["received_bytes"], result["rows_received"],
             reference["bytes"], reference["rows"], reference["unique"],
             reference["seconds"]))
    print("  while the job logged: %d state posts, %d of them 'complete "
          "with exit code != 0' (failed on W&B)"
          % (states["posts"], states["failed_posts"]))
    if states["failed_posts"]:
        low, high = states["failed_to_next_send"], \
            states["failed_to_next_state"]
        # wandb sync sends a short run's rows and its state in one post;
        # then both bounds are the same.
        shown = "%.0f s" % high if high - low < 0.5 else \
            "%.0f to %.0f s" % (low, high)
        print("  shown as failed for %s of the %.0f s it logged (until "
              "the next sync's rows or state)"
              % (shown, states["logging_seconds"]))
    print("  final state %s, %.1f s after the last run.log()"
          % (json.dumps(states["final"]), states["final_after"]))
    print()


def bytes_ratio(result):
    return result["received_bytes"] / result["reference"]["bytes"]


def verdict(passed):
    return "yes" if passed else "NO"


if __name__ == "__main__":
    sys.exit(main())
