"""What a live-mode farm costs in CPU and memory per run it keeps live.

For each number N of concurrent runs (1, 20, 50, 100; ``--quick``: 1 and
5) a fresh fake W&B server, farm and load generator are started:

- the fake W&B server of the test suite (``tests/fake_wandb.py``) runs in
  this process, on 127.0.0.1; nothing leaves the machine;
- the farm runs as a subprocess, ``python -m wandb_offline_sync.farm
  --mode live`` on 127.0.0.1 port 0, with a certificate made with
  openssl, its state directory in a temporary directory and
  ``WANDB_BASE_URL`` pointing at the fake server, so the real ``wandb
  beta sync --live`` processes it starts send there;
- the load generator is one or more trainer processes, each holding up
  to ``RUNS_PER_TRAINER`` offline wandb runs (``reinit="create_new"``,
  one wandb-core per process, which is far cheaper than a process per
  run) that log ``STEPS_PER_SECOND`` rows of a handful of scalars each,
  with ``WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=1``.  Every run has an
  agent of its own: an instance of the package's ``Agent`` class given
  the run's directory and id, with the agent's default ``frequency``,
  which sends the run's requests to the farm as ``agent.init()`` would.

Once every run is live on the farm (``/status``) and a row of each has
reached the fake server (a live sync's CLI takes seconds to start on a
busy machine), and after a short settling time that lets the live syncs
catch up, the farm's process tree is sampled every second over a
steady window (30 s; 8 s with ``--quick``): the farm process and all
its descendants, found through the parent pid in ``/proc`` (wandb-core
starts a session of its own, so process groups do not reach it).  CPU
is the change in utime+stime over the window; memory is the summed
VmRSS (and PSS, which counts shared pages once).  Then the trainers
are told to finish their runs, the farm is left to see each run to its
end, and every run is checked on the fake server: each logged step
arrived, and the run ended complete with exit code 0.

Printed per N: the farm tree's CPU in % of one core, its RSS (mean over
the window, and its change from the window's start to its end), the
number of live sync processes, the figures per run, the delay from
``run.log()`` to the row's arrival at the fake server for rows that
arrived during the window (p50, p95), the fewest rows any one run
delivered during the window (a starved run would show 0), and whether
every run arrived whole.  Then the check against the target: 100 runs
kept live with at most half a core and 2 GB.

The runs of a level start within seconds of each other, so they fill
whole live groups; runs that start more than the scheduler's
``live_group_wait`` apart each start a process of their own, and cost
up to a process (about 100 MB) each.  A 30 s window cannot show slow
memory growth; a soak test would.

The load generator and this process share the machine's cores with the
farm; their CPU over the window is printed too.  CPU seconds are what
the farm's processes used, so a busy machine moves them less than it
moves the delays, which grow when the cores are short.  Levels that do
not fit the memory available or the time limit are left out, with a
line saying so.  Every wait is bounded; every process started here (the
farm's and the trainers' descendants included) and every temporary
directory is removed at the end.  The exit status is 0 whatever the
verdicts, 1 when a level could not be measured, with one line saying
why.

Usage: python bench/farm_capacity.py [--quick] [--max-runs N]
       [--window SECONDS] [--time-limit SECONDS]
"""

import argparse
import base64
import http.client
import inspect
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import ssl
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
from wandb_offline_sync.agent import Agent  # noqa: E402
from wandb_offline_sync.certs import make_certificate  # noqa: E402
from wandb_offline_sync.scheduler import SyncScheduler  # noqa: E402

from fake_wandb import API_KEY, FakeWandbServer, \
    isolated_environ  # noqa: E402
from freshness import WANDB, percentile, verdict  # noqa: E402

#: The target: this many runs kept live ...
TARGET_RUNS = 100
#: ... with at most this many cores ...
TARGET_CORES = 0.5
#: ... and at most this much memory (summed VmRSS), in MB.
TARGET_RSS_MB = 2048

#: Numbers of concurrent runs measured, full and with --quick.
FULL_LEVELS = (1, 20, 50, 100)
QUICK_LEVELS = (1, 5)
#: Seconds of the steady window, full and with --quick.
FULL_WINDOW = 30.0
QUICK_WINDOW = 8.0
#: Seconds between all runs being live and the window's start, full and
#: with --quick: each live sync first sends what was logged before it
#: started, and the CLI's start-up is not the steady cost.
FULL_SETTLE = 10.0
QUICK_SETTLE = 4.0
#: Seconds between two samples of the process trees.
SAMPLE_INTERVAL = 1.0

#: Rows each run logs per second, evenly spaced.
STEPS_PER_SECOND = 5
#: WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL in the trainers, in seconds.
FLUSH_INTERVAL = 1
#: Runs one trainer process holds at most (one wandb-core each).
RUNS_PER_TRAINER = 25
#: The agent's least seconds between two requests: its own default.
AGENT_FREQUENCY = inspect.signature(Agent).parameters["frequency"].default

#: Seconds for the farm to start listening (it runs the wandb CLI twice
#: to check it first).
FARM_START_TIMEOUT = 90.0
#: Seconds for every run to be live: a base, plus this much per run for
#: the trainers' wandb.init() calls.
LIVE_TIMEOUT = 90.0
LIVE_TIMEOUT_PER_RUN = 1.5
#: Seconds for the trainers to finish their runs once told to stop, and
#: then for the farm to see every run to its end.
TRAINER_FINISH_TIMEOUT = 180.0
FARM_FINISH_TIMEOUT = 180.0
#: Seconds the farm may take to exit after SIGTERM.
FARM_STOP_TIMEOUT = 30.0
#: Default bound on the whole run, in seconds (--time-limit).
DEFAULT_TIME_LIMIT = 1200.0

#: Memory a level is assumed to need, to leave out levels that do not
#: fit: per live sync process, per run, and per trainer process, in MB.
#: Rough, and generous on purpose.
MB_PER_LIVE_PROCESS = 150
MB_PER_RUN = 2
MB_PER_TRAINER = 400

USERNAME = "bench"
PASSWORD = "farm capacity bench password"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# A trainer: RUNS_PER_TRAINER offline runs in one process, each with its
# own agent.  Prints each run's directory, then logs every run at a
# steady rate until the stop file appears (looked for once a second) or
# `max_seconds` passed, finishes each run and sends its final request,
# and prints the steps each run logged.  Rows carry the wall clock of
# their run.log() call.
TRAINER = textwrap.dedent("""
    import json, math, os, sys, time
    import wandb
    from wandb_offline_sync.agent import Agent

    stop_file = sys.argv[1]
    max_seconds, rate, frequency = map(float, sys.argv[2:5])
    run_ids = sys.argv[5:]
    runs = [wandb.init(project="farm-capacity", id=run_id,
                       reinit="create_new") for run_id in run_ids]
    agents = []
    for run in runs:
        run_dir = os.path.dirname(run.dir)
        agents.append(Agent(frequency=frequency, run_dir=run_dir,
                            run_id=run.id).start())
        print(json.dumps({"run_id": run.id, "run_dir": run_dir}),
              flush=True)
    period = 1.0 / rate
    start = time.monotonic()
    step = 0
    while step * period < max_seconds:
        if step % int(rate) == 0 and os.path.exists(stop_file):
            break
        pause = start + step * period - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        for run, agent in zip(runs, agents):
            run.log({"t_logged": time.time(), "loss": 1.0 / (step + 1),
                     "accuracy": 1.0 - math.exp(-step / 50.0),
                     "lr": 0.1 * 0.999 ** step, "grad_norm": 1.0,
                     "tokens": step * 4096})
            agent.trigger()
        step += 1
    for run, agent in zip(runs, agents):
        run.finish()
        agent.finish()
        agent.stop()
    print(json.dumps({"steps": step}), flush=True)
""")


class BenchError(Exception):
    """A level could not be measured."""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="N = %s with %.0f s windows, for a smoke "
                             "test" % (", ".join(map(str, QUICK_LEVELS)),
                                       QUICK_WINDOW))
    parser.add_argument("--max-runs", type=int, default=None,
                        help="measure no more concurrent runs than this "
                             "(a cap below the largest level is measured "
                             "as a level of its own)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds of each steady window (default: "
                             "%.0f, %.0f with --quick)"
                             % (FULL_WINDOW, QUICK_WINDOW))
    parser.add_argument("--time-limit", type=float,
                        default=DEFAULT_TIME_LIMIT,
                        help="seconds the whole run may take; levels "
                             "that would not fit are left out (default: "
                             "%(default)s)")
    args = parser.parse_args(argv)
    levels = list(QUICK_LEVELS if args.quick else FULL_LEVELS)
    if args.max_runs is not None:
        if not 1 <= args.max_runs <= SyncScheduler.max_live:
            parser.error("--max-runs must be in [1, %d] (the farm's "
                         "--max-live)" % SyncScheduler.max_live)
        capped = [n for n in levels if n <= args.max_runs]
        if args.max_runs < levels[-1] and args.max_runs not in capped:
            capped.append(args.max_runs)
        levels = capped
    window = args.window or (QUICK_WINDOW if args.quick else FULL_WINDOW)
    if not 2 <= window <= 600:
        parser.error("--window must be in [2, 600]")
    settle = QUICK_SETTLE if args.quick else FULL_SETTLE

    # SIGTERM unwinds like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    began = time.monotonic()
    results, left_out, failures = [], [], []
    scratch = tempfile.mkdtemp(prefix="farm-capacity-")
    try:
        certificate = (os.path.join(scratch, "cert.pem"),
                       os.path.join(scratch, "key.pem"))
        make_certificate(*certificate, ["127.0.0.1", "localhost"], days=1)
        for n in levels:
            why = why_not_fit(n, window, settle,
                              args.time_limit - (time.monotonic() - began))
            if why:
                left_out.append((n, why))
                continue
            print("measuring N=%d: %d trainer(s), %.0f s window ..."
                  % (n, trainers_for(n), window), file=sys.stderr,
                  flush=True)
            folder = os.path.join(scratch, "n%d" % n)
            os.makedirs(folder)
            try:
                results.append(measure_level(n, folder, certificate,
                                             window, settle))
            except BenchError as exc:
                failures.append((n, str(exc)))
                print("farm_capacity: N=%d: error: %s" % (n, exc),
                      file=sys.stderr, flush=True)
                # A larger level would fail the same way, only slower.
                left_out.extend((m, "N=%d could not be measured" % n)
                                for m in levels if m > n)
                break
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(results, left_out, failures, window, settle,
           time.monotonic() - began)
    return 1 if failures or not results else 0


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def trainers_for(n):
    return math.ceil(n / RUNS_PER_TRAINER)


def live_processes_for(n):
    return math.ceil(n / SyncScheduler.live_group_size)


def why_not_fit(n, window, settle, seconds_left):
    """Why level ``n`` is left out, or None when it fits."""
    needed_mb = (live_processes_for(n) * MB_PER_LIVE_PROCESS +
                 n * MB_PER_RUN + trainers_for(n) * MB_PER_TRAINER)
    available_mb = _meminfo_mb("MemAvailable")
    if available_mb is not None and needed_mb > available_mb:
        return ("needs about %d MB, %d MB available"
                % (needed_mb, available_mb))
    # Start-up, wandb.init() of the trainers' runs, and the finish.
    needed_s = 60.0 + 1.0 * n + settle + window + 60.0
    if needed_s > seconds_left:
        return ("needs about %.0f s, %.0f s left of --time-limit"
                % (needed_s, seconds_left))
    return None


def _meminfo_mb(field):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- one level ---------------------------------------------------------

def measure_level(n, folder, certificate, window, settle):
    """Measure a fresh farm with ``n`` live runs; return a dict."""
    run_ids = ["n%dr%03d" % (n, i) for i in range(n)]
    jobs_root = os.path.join(folder, "jobs")
    os.makedirs(jobs_root)
    stop_file = os.path.join(folder, "stop")
    farm_log = os.path.join(folder, "farm.log")
    trainers = []
    with FakeWandbServer() as fake:
        farm = start_farm(fake, folder, certificate, jobs_root, farm_log)
        try:
            port = wait_listening(farm, farm_log)
            client = FarmClient(port, certificate[0])
            trainers = start_trainers(run_ids, folder, jobs_root, port,
                                      certificate[0], stop_file,
                                      settle + window)
            live_wait = LIVE_TIMEOUT + LIVE_TIMEOUT_PER_RUN * n
            began = time.monotonic()
            before = wait_all_live(client, run_ids, trainers, live_wait)
            all_live_after = time.monotonic() - began
            # "live" on the farm means the CLI was started; on a busy
            # machine it takes seconds more before it sends anything.
            wait_all_sending(fake, run_ids, max(
                1.0, began + live_wait - time.monotonic()))
            all_sending_after = time.monotonic() - began
            time.sleep(settle)

            samples = sample_window(farm.pid, trainers, window)
            after = client.status()
            with open(stop_file, "w"):
                pass
            steps = wait_trainers(trainers, TRAINER_FINISH_TIMEOUT)
            finished = wait_farm_done(client, run_ids, FARM_FINISH_TIMEOUT)
        finally:
            for trainer in trainers:
                _end_tree(trainer, trainer.tree)
            farm_exit = stop_farm(farm)
        arrivals = {run_id: fake.history_arrivals(run_id)
                    for run_id in run_ids}
        final_states = {run_id: fake.final_state(run_id)
                        for run_id in run_ids}

    result = {"n": n, "trainers": len(trainers),
              "all_live_after": all_live_after,
              "all_sending_after": all_sending_after,
              "farm_exit": farm_exit,
              "farm_info": after["farm"]}
    result.update(tree_figures(samples))
    result.update(live_figures(before, after, run_ids))
    result.update(arrival_figures(arrivals, samples[0][0], samples[-1][0],
                                  window))
    result.update(end_figures(arrivals, final_states, steps, finished,
                              run_ids))
    result.update(farm_log_figures(farm_log))
    return result


def start_farm(fake, folder, certificate, jobs_root, log_path):
    """``python -m wandb_offline_sync.farm --mode live`` talking to
    ``fake``, on 127.0.0.1 port 0."""
    environ = isolated_environ(os.path.join(folder, "farm-env"))
    del environ["WANDB_MODE"]
    environ.update({
        "PYTHONPATH": REPO,
        "WANDB_BASE_URL": fake.url,
        "WANDB_API_KEY": API_KEY,
        protocol.ENV_USERNAME: USERNAME,
        protocol.ENV_PASSWORD: PASSWORD,
    })
    argv = [sys.executable, "-m", "wandb_offline_sync.farm",
            "--mode", "live", "--host", "127.0.0.1", "--port", "0",
            "--cert", certificate[0], "--key", certificate[1],
            "--allow-root", jobs_root,
            "--state-dir", os.path.join(folder, "farm-state"),
            "--wandb-command", shlex.quote(WANDB)]
    with open(log_path, "wb") as out:
        farm = subprocess.Popen(argv, env=environ, cwd=folder,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)
    farm.tree = []
    return farm


_LISTENING = re.compile(r"listening on https://[^\s]+:(\d+) ")


def wait_listening(farm, log_path):
    """The farm's port, once it logged that it listens."""
    deadline = time.monotonic() + FARM_START_TIMEOUT
    while time.monotonic() < deadline:
        match = _LISTENING.search(_read_text(log_path))
        if match:
            return int(match.group(1))
        if farm.poll() is not None:
            raise BenchError("the farm exited %d at start: %s"
                             % (farm.returncode, _tail(log_path)))
        time.sleep(0.2)
    raise BenchError("the farm did not listen within %.0f s: %s"
                     % (FARM_START_TIMEOUT, _tail(log_path)))


class FarmClient:
    """GET /status from the farm, with its certificate pinned."""

    def __init__(self, port, cert):
        self.port = port
        self.context = ssl.create_default_context(cafile=cert)
        self.context.check_hostname = False
        token = "%s:%s" % (USERNAME, PASSWORD)
        self.authorization = "Basic " + base64.b64encode(
            token.encode("utf-8")).decode("ascii")

    def status(self):
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context, timeout=30)
        try:
            connection.request("GET", protocol.STATUS_PATH, headers={
                "Authorization": self.authorization})
            answer = connection.getresponse()
            body = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError("GET /status failed: %s" % exc) from None
        finally:
            connection.close()
        if answer.status != 200:
            raise BenchError("GET /status answered %d: %s"
                             % (answer.status, body[:200]))
        return json.loads(body)


def start_trainers(run_ids, folder, jobs_root, port, cert, stop_file,
                   steady_seconds):
    environ = isolated_environ(jobs_root)
    environ.update({
        "PYTHONPATH": REPO,
        "WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL": str(FLUSH_INTERVAL),
        protocol.ENV_HOST: "127.0.0.1",
        protocol.ENV_PORT: str(port),
        protocol.ENV_USERNAME: USERNAME,
        protocol.ENV_PASSWORD: PASSWORD,
        protocol.ENV_CERT: cert,
    })
    # Logging stops at the stop file; this only bounds a trainer that
    # would otherwise outlive a bench that lost track of it.
    max_seconds = (LIVE_TIMEOUT + LIVE_TIMEOUT_PER_RUN * len(run_ids) +
                   steady_seconds + 60.0)
    trainers = []
    for number, first in enumerate(range(0, len(run_ids),
                                         RUNS_PER_TRAINER)):
        argv = [sys.executable, "-c", TRAINER, stop_file, str(max_seconds),
                str(STEPS_PER_SECOND), str(AGENT_FREQUENCY)]
        argv += run_ids[first:first + RUNS_PER_TRAINER]
        out_path = os.path.join(folder, "trainer-%d.out" % number)
        err_path = os.path.join(folder, "trainer-%d.err" % number)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # A session of its own, so that its group can be ended; its
            # wandb-core starts another and is found by parent pid.
            trainer = subprocess.Popen(
                argv, env=environ, cwd=folder, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True)
        trainer.out_path, trainer.err_path = out_path, err_path
        trainer.tree = []
        trainers.append(trainer)
    return trainers


def wait_all_live(client, run_ids, trainers, timeout):
    """Wait until every run is followed by a running live sync; return
    the farm's status then (or at the timeout, if some never were)."""
    deadline = time.monotonic() + timeout
    while True:
        for trainer in trainers:
            trainer.tree = _tree_snapshot(trainer.pid)
            if trainer.poll() is not None:
                raise BenchError("a trainer exited %d before its runs "
                                 "were live: %s"
                                 % (trainer.returncode,
                                    _tail(trainer.err_path)))
        status = client.status()
        if len(_live_runs(status, run_ids)) == len(run_ids) or \
                time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if not _live_runs(status, run_ids):
        raise BenchError("no run went live within %.0f s" % timeout)
    return status


def wait_all_sending(fake, run_ids, timeout):
    """Wait until a row of every run has reached the fake server (the
    window is measured all the same if some never do)."""
    deadline = time.monotonic() + timeout
    waiting = list(run_ids)
    while waiting and time.monotonic() < deadline:
        waiting = [run_id for run_id in waiting
                   if not fake.history_offsets(run_id)]
        time.sleep(0.5)


def _live_runs(status, run_ids):
    wanted = set(run_ids)
    return [run for run in status["runs"]
            if run["run_id"] in wanted and run["state"] == "live" and
            (run["live"] or {}).get("alive")]


def wait_trainers(trainers, timeout):
    """Wait for the trainers to finish their runs; return the steps each
    run logged."""
    deadline = time.monotonic() + timeout
    steps = {}
    for trainer in trainers:
        try:
            trainer.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BenchError("a trainer did not finish its runs within "
                             "%.0f s of the stop" % timeout) from None
        said = [json.loads(line) for line in
                _read_text(trainer.out_path).splitlines()
                if line.startswith("{")]
        if trainer.returncode != 0 or not said or "steps" not in said[-1]:
            raise BenchError("a trainer failed (exit %d): %s"
                             % (trainer.returncode,
                                _tail(trainer.err_path)))
        for line in said[:-1]:
            steps[line["run_id"]] = said[-1]["steps"]
    return steps


def wait_farm_done(client, run_ids, timeout):
    """Wait until the farm has finished every run; return seconds it took
    and the runs' records."""
    began = time.monotonic()
    wanted = set(run_ids)
    while True:
        runs = [run for run in client.status()["runs"]
                if run["run_id"] in wanted]
        ended = [run for run in runs if run["state"] in ("done", "failed")]
        if len(ended) == len(run_ids) or \
                time.monotonic() - began >= timeout:
            break
        time.sleep(1.0)
    return {"seconds": time.monotonic() - began,
            "runs": {run["run_id"]: run for run in runs}}


def stop_farm(farm):
    """SIGTERM the farm, as an operator would; its exit code, or None if
    it had to be killed."""
    farm.tree = _tree_snapshot(farm.pid)
    exit_code = farm.poll()
    if exit_code is None:
        farm.send_signal(signal.SIGTERM)
        try:
            exit_code = farm.wait(FARM_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            exit_code = None
    _end_tree(farm, farm.tree)
    return exit_code


# -- processes ---------------------------------------------------------

class _Proc:
    """One line of /proc/<pid>/stat, the fields used here."""

    __slots__ = ("pid", "ppid", "cpu", "started", "comm")

    def __init__(self, pid, ppid, cpu, started, comm):
        self.pid, self.ppid, self.cpu = pid, ppid, cpu
        self.started, self.comm = started, comm


def _process_table():
    """{pid: _Proc} for every process there is."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        # Fields 4 (ppid), 14 and 15 (utime, stime) and 22 (start
        # time) of proc(5), counted after the parenthesised command name.
        head, _, rest = data.rpartition(b")")
        fields = rest.split()
        try:
            table[int(name)] = _Proc(
                int(name), int(fields[1]),
                (int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
                int(fields[19]),
                head.split(b"(", 1)[1].decode("utf-8", "replace"))
        except (IndexError, ValueError):
            continue
    return table


def _descendants(table, pid):
    """``pid`` and every descendant of it in ``table``, by parent pid."""
    children = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found, seen, stack = [], {pid}, [pid]
    while stack:
        current = stack.pop()
        if current in table:
            found.append(table[current])
        for child in children.get(current, ()):
            # Finite even if pids were reused while /proc was read.
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return found


def _tree_snapshot(pid):
    """(pid, start time) of ``pid`` and its descendants, to end them
    later without hitting a reused pid."""
    return [(proc.pid, proc.started)
            for proc in _descendants(_process_table(), pid)]


def _end_tree(popen, snapshot):
    """SIGKILL what is left of a process started here and of the
    descendants it had (wandb-core leaves its parent's session)."""
    if popen.poll() is None:
        snapshot = snapshot + _tree_snapshot(popen.pid)
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    table = _process_table()
    for pid, started in snapshot:
        if pid in table and table[pid].started == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    popen.wait()


def _status_kb(pid, path, field):
    try:
        with open("/proc/%d/%s" % (pid, path), "rb") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _kind(proc, root, cmdlines):
    """What a process in the farm's tree is."""
    if proc.pid == root:
        return "farm"
    if proc.comm.startswith("wandb-core"):
        return "core"
    key = (proc.pid, proc.started)
    if key not in cmdlines:
        try:
            with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
                cmdlines[key] = f.read().split(b"\0")
        except OSError:
            cmdlines[key] = []
    return "live" if b"--live" in cmdlines[key] else "other"


def sample_window(farm_pid, trainers, seconds):
    """Sample the farm's tree, the trainers' trees and this process once
    per SAMPLE_INTERVAL for ``seconds``; return the samples.

    Each sample is (time.time(), {tree: {(pid, start): (cpu seconds,
    rss kB, pss kB, kind)}}).  PSS is read for the farm's tree only.
    """
    samples = []
    cmdlines = {}
    count = int(round(seconds / SAMPLE_INTERVAL)) + 1
    start = time.monotonic()
    for number in range(count):
        pause = start + number * SAMPLE_INTERVAL - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        table = _process_table()
        trees = {"farm": {}, "load": {}, "bench": {}}
        for proc in _descendants(table, farm_pid):
            trees["farm"][(proc.pid, proc.started)] = (
                proc.cpu, _status_kb(proc.pid, "status", b"VmRSS:"),
                _status_kb(proc.pid, "smaps_rollup", b"Pss:"),
                _kind(proc, farm_pid, cmdlines))
        for trainer in trainers:
            for proc in _descendants(table, trainer.pid):
                trees["load"][(proc.pid, proc.started)] = (
                    proc.cpu, _status_kb(proc.pid, "status", b"VmRSS:"),
                    0, "load")
        me = table.get(os.getpid())
        if me is not None:
            trees["bench"][(me.pid, me.started)] = (me.cpu, 0, 0, "bench")
        samples.append((time.time(), trees))
    return samples


# -- figures -----------------------------------------------------------

def tree_cpu(samples, tree):
    """CPU seconds a tree used over the samples.  A process that started
    during the window counts from zero; one that ended counts up to its
    last sample (at most SAMPLE_INTERVAL of its CPU is missed)."""
    first = samples[0][1][tree]
    last = {}
    for _, trees in samples:
        last.update(trees[tree])
    return sum(values[0] - (first[key][0] if key in first else 0.0)
               for key, values in last.items())


def tree_figures(samples):
    seconds = samples[-1][0] - samples[0][0]
    rss = [sum(v[1] for v in trees["farm"].values()) / 1024.0
           for _, trees in samples]
    pss = [sum(v[2] for v in trees["farm"].values()) / 1024.0
           for _, trees in samples]
    load_rss = [sum(v[1] for v in trees["load"].values()) / 1024.0
                for _, trees in samples]

    def count(kind):
        return [sum(1 for v in trees["farm"].values() if v[3] == kind)
                for _, trees in samples]

    return {
        "window": seconds,
        "cpu_pct": 100.0 * tree_cpu(samples, "farm") / seconds,
        "load_cpu_pct": 100.0 * tree_cpu(samples, "load") / seconds,
        "bench_cpu_pct": 100.0 * tree_cpu(samples, "bench") / seconds,
        "rss_mean": sum(rss) / len(rss), "rss_max": max(rss),
        "rss_change": rss[-1] - rss[0],
        "pss_mean": sum(pss) / len(pss),
        "load_rss_mean": sum(load_rss) / len(load_rss),
        "live_processes": (min(count("live")), max(count("live"))),
        "core_processes": (min(count("core")), max(count("core"))),
        "other_processes": max(count("other")),
        "farm_rss": sum(v[1] for v in samples[-1][1]["farm"].values()
                        if v[3] == "farm") / 1024.0,
    }


def live_figures(before, after, run_ids):
    """Live syncs at the window's start and end, from /status."""
    wanted = set(run_ids)

    def groups(status):
        found = {}
        for run in status["runs"]:
            live = run["live"] or {}
            if run["run_id"] in wanted and live.get("alive"):
                found.setdefault(live["pid"], []).append(run["run_id"])
        return found

    def restarts(status):
        return sum((run["live"] or {}).get("restarts", 0)
                   for run in status["runs"] if run["run_id"] in wanted)

    def requests(status):
        return sum(run["requests"] for run in status["runs"]
                   if run["run_id"] in wanted)

    start, end = groups(before), groups(after)
    live_before = {run["run_id"] for run in _live_runs(before, run_ids)}
    return {
        "group_sizes": sorted((len(v) for v in start.values()),
                              reverse=True),
        "never_live": sorted(wanted - live_before),
        "processes_replaced": len(set(start) - set(end)),
        "live_at_end": len(_live_runs(after, run_ids)),
        "restarts_in_window": restarts(after) - restarts(before),
        "requests_in_window": requests(after) - requests(before),
    }


def arrival_figures(arrivals, window_start, window_end, window):
    """Delays of rows that arrived during the window, and rows per run."""
    delays = []
    per_run = []
    for rows in arrivals.values():
        inside = [when - row["t_logged"] for when, row in rows
                  if window_start <= when <= window_end and
                  "t_logged" in row]
        delays.extend(inside)
        per_run.append(len(inside))
    delays.sort()
    return {
        "delay_p50": percentile(delays, 0.5) if delays else None,
        "delay_p95": percentile(delays, 0.95) if delays else None,
        "delay_max": delays[-1] if delays else None,
        "rows_min": min(per_run), "rows_max": max(per_run),
        "rows_expected": STEPS_PER_SECOND * window,
        "starved": sum(1 for count in per_run if count == 0),
    }


def end_figures(arrivals, final_states, steps, finished, run_ids):
    """Whether every run arrived whole and ended well."""
    incomplete, duplicates, bad_end, not_done = [], 0, [], []
    records = finished["runs"]
    for run_id in run_ids:
        arrived = [row.get("_step") for _, row in arrivals[run_id]]
        unique = set(arrived)
        duplicates += len(arrived) - len(unique)
        if run_id not in steps or unique != set(range(steps[run_id])):
            incomplete.append(run_id)
        if final_states[run_id] != {"complete": True, "exitcode": 0}:
            bad_end.append(run_id)
        record = records.get(run_id)
        if record is None or record["state"] != "done":
            not_done.append(run_id)
    return {"steps_logged": sum(steps.values()),
            "incomplete": incomplete, "duplicates": duplicates,
            "bad_end": bad_end, "not_done": not_done,
            "done_after": finished["seconds"]}


def farm_log_figures(log_path):
    """Live syncs started, how runs ended, and the farm's warnings and
    errors, from the farm's INFO log."""
    text = _read_text(log_path)
    problems = [line.split(": ", 1)[-1] for line in text.splitlines()
                if " WARNING " in line or " ERROR " in line]
    return {"live_started": text.count("live sync started:"),
            "ended_live": text.count("live sync followed the run to its "
                                     "end"),
            "ordinary_syncs": len(re.findall(r" sync done: run=", text)),
            "problems": problems}


# -- reporting ---------------------------------------------------------

def report(results, left_out, failures, window, settle, elapsed):
    print("wandb-offline-sync farm capacity: python %s, %d cpus, %s MB "
          "of memory" % (platform.python_version(), os.cpu_count(),
                         _meminfo_mb("MemTotal")))
    if results:
        info = results[0]["farm_info"]
        largest = results[-1]
        version = re.search(r"\d+\.\d+\S*", info.get("wandb") or "")
        print("design: %s mode, wandb %s, live interval %g s, groups of "
              "up to %d runs per `wandb beta sync --live` process, a new "
              "run waits up to %g s for others, at most %d runs live, "
              "%d sync threads (from /status; group size, wait and max "
              "live are the scheduler's defaults); at N=%d: %d live "
              "process(es) of %s runs"
              % (info.get("mode"), version and version.group(),
                 info.get("live_interval"),
                 SyncScheduler.live_group_size,
                 SyncScheduler.live_group_wait, SyncScheduler.max_live,
                 info.get("num_threads"), largest["n"],
                 len(largest["group_sizes"]),
                 "+".join(map(str, largest["group_sizes"]))))
    print("load: each run logs %d rows/s of 6 scalars, "
          "WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=%d; up to %d runs per "
          "trainer process (one wandb-core each), every run with its own "
          "Agent(run_dir=..., frequency=%g); the runs start within "
          "seconds of each other, so they fill whole groups"
          % (STEPS_PER_SECOND, FLUSH_INTERVAL, RUNS_PER_TRAINER,
             AGENT_FREQUENCY))
    print("measured: the farm process and all its descendants (live "
          "syncs, their wandb-core), utime+stime over a %.0f s window "
          "that starts %.0f s after a row of every run reached the "
          "server; RSS is summed "
          "VmRSS, PSS counts shared pages once"
          % (window, settle))
    print("the load generator and the fake W&B server share the machine's "
          "%d cores with the farm" % os.cpu_count())
    print("delay: run.log() to the row's arrival at the fake W&B server, "
          "rows that arrived in the window")
    print()
    if results:
        print("%5s %5s %6s %7s %8s %7s %8s %8s %6s %6s %9s %6s"
              % ("runs", "live", "CPU", "RSS", "RSS", "PSS", "CPU/run",
                 "RSS/run", "p50", "p95", "rows/run", "whole"))
        print("%5s %5s %6s %7s %8s %7s %8s %8s %6s %6s %9s %6s"
              % ("", "procs", "%core", "MB", "change", "MB", "%core",
                 "MB", "s", "s", "min/exp", ""))
        for r in results:
            print("%5d %5s %6.1f %7.0f %+8.1f %7.0f %8.2f %8.1f %6s %6s "
                  "%4d/%-4d %6s"
                  % (r["n"], _span(r["live_processes"]), r["cpu_pct"],
                     r["rss_mean"], r["rss_change"], r["pss_mean"],
                     r["cpu_pct"] / r["n"], r["rss_mean"] / r["n"],
                     _seconds(r["delay_p50"]), _seconds(r["delay_p95"]),
                     r["rows_min"], r["rows_expected"],
                     verdict(_whole(r))))
        print()
        for r in results:
            report_details(r)
    for n, why in left_out:
        print("N=%d left out: %s" % (n, why))
    for n, why in failures:
        print("N=%d could not be measured: %s" % (n, why))
    report_target(results)
    print("Took %.0f s." % elapsed)


def report_details(r):
    print("N=%d:" % r["n"])
    print("  every run live on the farm %.0f s after the trainers "
          "started, a row of each at the server after %.0f s; live syncs "
          "started: %d; groups: %s"
          % (r["all_live_after"], r["all_sending_after"],
             r["live_started"],
             "+".join(map(str, r["group_sizes"]))))
    if r["never_live"]:
        print("  never live: %d runs (%s)" % (
            len(r["never_live"]), ", ".join(r["never_live"][:5])))
    print("  processes: %s live syncs, %s wandb-core, %d other; the farm "
          "process itself %.0f MB"
          % (_span(r["live_processes"]), _span(r["core_processes"]),
             r["other_processes"], r["farm_rss"]))
    print("  in the window: RSS mean %.0f MB, max %.0f MB, change %+.1f "
          "MB; live syncs replaced %d, restarts %d; requests from agents "
          "%d; delay max %s s; rows per run %d to %d (expected %d), "
          "runs with none: %d"
          % (r["rss_mean"], r["rss_max"], r["rss_change"],
             r["processes_replaced"], r["restarts_in_window"],
             r["requests_in_window"], _seconds(r["delay_max"]),
             r["rows_min"], r["rows_max"], r["rows_expected"],
             r["starved"]))
    print("  load generator %d trainer(s) with their wandb-core: %.0f %% "
          "of a core, %.0f MB; this process (fake W&B server): %.0f %%"
          % (r["trainers"], r["load_cpu_pct"], r["load_rss_mean"],
             r["bench_cpu_pct"]))
    print("  at the end: %d steps logged, runs missing steps: %d, rows "
          "sent twice: %d, runs not ended complete with exit code 0: %d, "
          "runs not done on the farm: %d (all done %.0f s after the "
          "trainers exited); runs ended by their live sync: %d, "
          "ordinary syncs: %d; farm exit code %s"
          % (r["steps_logged"], len(r["incomplete"]), r["duplicates"],
             len(r["bad_end"]), len(r["not_done"]), r["done_after"],
             r["ended_live"], r["ordinary_syncs"], r["farm_exit"]))
    if r["problems"]:
        print("  farm warnings and errors: %d, e.g. %s"
              % (len(r["problems"]), r["problems"][0][:160]))
    print()


def report_target(results):
    label = ("%d runs kept live with at most %.1f core and %d MB"
             % (TARGET_RUNS, TARGET_CORES, TARGET_RSS_MB))
    at_target = [r for r in results if r["n"] == TARGET_RUNS]
    if at_target:
        r = at_target[0]
        passed = (r["cpu_pct"] <= 100 * TARGET_CORES and
                  r["rss_max"] <= TARGET_RSS_MB and _whole(r) and
                  not r["never_live"])
        print("%s: %s (%.1f %% of a core, RSS max %.0f MB, every run live "
              "and whole: %s)" % (label, verdict(passed), r["cpu_pct"],
                                  r["rss_max"], verdict(_whole(r))))
        return
    largest = max((r["n"] for r in results), default=0)
    processes = live_processes_for(TARGET_RUNS)
    cpu = _fit_at([(r["live_processes"][1], r["n"], r["cpu_pct"])
                   for r in results], processes, TARGET_RUNS)
    rss = _fit_at([(r["live_processes"][1], r["n"], r["rss_max"])
                   for r in results], processes, TARGET_RUNS)
    if cpu is None or rss is None:
        print("%s: not measured (largest N measured: %d)"
              % (label, largest))
        return
    print("%s: not measured (largest N measured: %d); cost = a per live "
          "process + b per run, fitted to the measured levels, gives "
          "%.0f %% of a core and %.0f MB for %d runs in %d processes: an "
          "estimate, not a verdict"
          % (label, largest, cpu, rss, TARGET_RUNS, processes))


def _fit_at(points, processes, runs):
    """Least squares of y = a * processes + b * runs through ``points``
    (processes, runs, y), evaluated at ``processes``, ``runs``; None when
    the points do not tell a from b."""
    pp = sum(p * p for p, _, _ in points)
    pr = sum(p * r for p, r, _ in points)
    rr = sum(r * r for _, r, _ in points)
    py = sum(p * y for p, _, y in points)
    ry = sum(r * y for _, r, y in points)
    determinant = pp * rr - pr * pr
    if abs(determinant) < 1e-9:
        return None
    a = (py * rr - ry * pr) / determinant
    b = (ry * pp - py * pr) / determinant
    return a * processes + b * runs


def _whole(r):
    return not (r["incomplete"] or r["bad_end"] or r["not_done"] or
                r["starved"])


def _span(pair):
    low, high = pair
    return str(low) if low == high else "%d-%d" % (low, high)


def _seconds(value):
    return "-" if value is None else "%.1f" % value


def _read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _tail(path, chars=600):
    return _read_text(path).strip()[-chars:] or "(no output)"


if __name__ == "__main__":
    sys.exit(main())
