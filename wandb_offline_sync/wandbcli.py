"""Running the real ``wandb`` CLI once, and judging what it did.

One :class:`WandbCli` runs ``wandb sync`` on a run directory as an argv list
(never a shell), with stdin from /dev/null, in a process group of its own,
in a scratch working directory that is removed afterwards (the CLI leaves
debug logs in its working directory), with a timeout that kills the whole
group.  Output goes to files, not pipes, so a grandchild that keeps a pipe
open cannot hang the farm.

The exit code alone does not say whether a sync worked: wandb 0.31 exits 0
after most failures and reports them as ``wandb: ERROR`` lines.
:func:`classify` reads the output and sorts an attempt into one of the
outcomes below.  Scheduling and retries are left to the scheduler.
"""

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from .errors import ConfigError

__all__ = [
    "WandbCli", "Attempt", "classify",
    "OK", "NOT_READY", "TRANSIENT", "PERMANENT",
]

log = logging.getLogger(__name__)

# Outcomes of one attempt.
OK = "ok"                  # data reached W&B
NOT_READY = "not_ready"    # the run's log has nothing complete to send yet
TRANSIENT = "transient"    # worth retrying: timeout, network, 429/5xx
PERMANENT = "permanent"    # retrying will not help: auth, missing run

_ERROR_MARK = "wandb: ERROR"
# Lines that report a failure: wandb's own, and click's usage errors.
_ERROR_LINE = re.compile(r"wandb: ERROR|^Error: ")
# What wandb 0.31 prints, and the outcome each text implies.  Checked in
# order against the error lines; the first match wins.  A W&B answer of
# 401/403 is printed as the server's message alone, with no status, so it
# cannot be told from other errors and is retried as transient until
# max_failures.
_PATTERNS = tuple((re.compile(pattern, re.IGNORECASE), outcome, reason)
                  for pattern, outcome, reason in (
    (r"no api key", PERMANENT, "no W&B API key is configured on the farm"),
    (r"api key must|wandb_api_key invalid", PERMANENT,
     "the farm's W&B API key is invalid"),
    (r"permission denied|operation not permitted", PERMANENT,
     "no permission to write the run directory"),
    (r"does not exist|no such file or directory", PERMANENT,
     "the run directory is gone"),
    (r"incomplete record", NOT_READY,
     "the run's log ends in a record still being written"),
    (r"next record: EOF|\bEOF$", NOT_READY,
     "the run's log holds no complete record yet"),
    (r"\b429\b", TRANSIENT, "W&B is rate limiting (429)"),
    (r"\b5\d\d\b", TRANSIENT, "W&B answered with a server error (5xx)"),
    (r"connection refused|no such host|name resolution|dial tcp",
     TRANSIENT, "W&B could not be reached"),
    (r"timed? ?out|deadline exceeded", TRANSIENT,
     "the connection to W&B timed out"),
    (r"giving up after|while uploading data", TRANSIENT,
     "W&B did not accept the data; will retry"),
))
_PGID_FILE = "pgid"
_RUN_URL = re.compile(r"View run (\S+) at (https?://\S+)")
# How many lines of the CLI's stderr an attempt keeps for /status.
TAIL_LINES = 20


class Attempt:
    """What one run of the CLI did."""

    __slots__ = ("started", "ended", "exit_code", "timed_out", "outcome",
                 "reason", "stderr_tail", "argv", "run_url")

    def __init__(self, *, started, ended, exit_code, timed_out, outcome,
                 reason, stderr_tail, argv, run_url=None):
        self.started = started          # wall clock, seconds
        self.ended = ended
        self.exit_code = exit_code      # None when killed at the timeout
        self.timed_out = timed_out
        self.outcome = outcome
        self.reason = reason
        self.stderr_tail = stderr_tail  # list of str
        self.argv = argv
        self.run_url = run_url          # where W&B shows the run, if said

    def to_dict(self):
        return {
            "started": self.started, "ended": self.ended,
            "exit_code": self.exit_code, "timed_out": self.timed_out,
            "outcome": self.outcome, "reason": self.reason,
            "stderr_tail": list(self.stderr_tail),
        }


def find_run_url(output):
    """The run's page on W&B, from wandb's "View run ... at URL" line."""
    match = _RUN_URL.search(output)
    return match.group(2) if match else None


def classify(exit_code, output, timed_out=False):
    """Return ``(outcome, reason)`` for an attempt's exit code and output.

    ``output`` is the CLI's stdout and stderr together.
    """
    if timed_out:
        return TRANSIENT, "the sync did not finish before the timeout"
    error_lines = [line for line in output.splitlines()
                   if _ERROR_LINE.search(line)]
    if not error_lines and exit_code == 0:
        return OK, "synced"
    for line in error_lines:
        for pattern, outcome, reason in _PATTERNS:
            if pattern.search(line):
                return outcome, reason
    if exit_code is not None and exit_code < 0:
        return TRANSIENT, "wandb was killed by signal %d" % -exit_code
    if error_lines:
        first = _ERROR_LINE.split(error_lines[-1], 1)[-1].strip(" :")
        return TRANSIENT, "wandb reported an error: %s" % first[:200]
    return TRANSIENT, "wandb exited with code %d" % exit_code


class WandbCli:
    """Runs ``wandb sync`` on run directories; one object per farm."""

    #: Seconds between SIGTERM and SIGKILL when a sync is stopped.
    kill_grace = 3.0

    def __init__(self, command=("wandb",), *, timeout=600.0, work_root=None,
                 verbose=False, environ=None):
        self.command = list(command)
        self.timeout = timeout
        self.verbose = verbose
        self.work_root = work_root or tempfile.gettempdir()
        self.environ = _child_environ(os.environ if environ is None
                                      else environ)
        # Guards _running: process groups of syncs under way.
        self._lock = threading.Lock()
        self._running = set()
        self._closed = False

    def sync_argv(self, run_dir):
        """The argv that syncs ``run_dir``."""
        argv = self.command + ["sync", "--include-synced"]
        if not os.path.basename(run_dir).startswith("offline-"):
            argv.append("--include-online")
        argv.append(run_dir)
        return argv

    def live_argv(self, run_dirs):
        """The argv that follows ``run_dirs`` live until their runs end."""
        # -n: wandb follows only that many runs at once (5 by default)
        # and starts the others when those end.
        argv = self.command + ["beta", "sync", "--live", "--no-skip-synced",
                               "-n", str(max(1, len(run_dirs)))]
        if any(not os.path.basename(d).startswith("offline-")
               for d in run_dirs):
            argv.append("--no-skip-online")
        return argv + list(run_dirs)

    def supports_live(self):
        """Whether the installed CLI offers ``beta sync --live``."""
        try:
            os.makedirs(self.work_root, exist_ok=True)
            done = subprocess.run(
                self.command + ["beta", "sync", "--help"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, timeout=120, env=self.environ,
                cwd=self.work_root)
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode == 0 and \
            re.search(rb"^\s+--live\b", done.stdout, re.M) is not None

    def start_live(self, run_dirs, transmit_interval=2.0):
        """Start following ``run_dirs`` live in one process; return its
        :class:`LiveSync`.

        Raises OSError when the CLI cannot be started, and RuntimeError
        when the farm is closing.
        """
        argv = self.live_argv(run_dirs)
        os.makedirs(self.work_root, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="live-", dir=self.work_root)
        out_path = os.path.join(workdir, "output.txt")
        # The live sync's send interval sets most of the delay between
        # wandb.log() in the job and the data on W&B.
        env = dict(self.environ, WANDB_X_FILE_STREAM_TRANSMIT_INTERVAL=str(
            max(1, int(round(transmit_interval)))))
        try:
            with open(out_path, "wb") as out:
                proc = self._spawn(argv, workdir, out, env)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        if proc is None:
            shutil.rmtree(workdir, ignore_errors=True)
            raise RuntimeError("the farm is shutting down")
        return LiveSync(self, proc, workdir, out_path, argv)

    def version(self):
        """The installed CLI's version line; ConfigError if not runnable."""
        argv = self.command + ["--version"]
        try:
            os.makedirs(self.work_root, exist_ok=True)
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, timeout=120, env=self.environ,
                cwd=self.work_root)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ConfigError("cannot run %s: %s"
                              % (" ".join(argv), exc)) from None
        text = done.stdout.decode("utf-8", "replace").strip()
        if done.returncode != 0:
            raise ConfigError("%s exited with code %d: %s"
                              % (" ".join(argv), done.returncode,
                                 text[-300:]))
        return text.splitlines()[-1] if text else "unknown"

    def sync(self, run_dir):
        """Run one sync of ``run_dir`` and return its :class:`Attempt`."""
        return self.run(self.sync_argv(run_dir), label=run_dir)

    def run(self, argv, *, label="", timeout=None):
        """Run ``argv`` as a supervised sync attempt."""
        timeout = self.timeout if timeout is None else timeout
        os.makedirs(self.work_root, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="sync-", dir=self.work_root)
        started = time.time()
        timed_out = False
        exit_code = None
        refused = None
        try:
            out_path = os.path.join(workdir, "output.txt")
            with open(out_path, "wb") as out:
                try:
                    proc = self._spawn(argv, workdir, out)
                except OSError as exc:
                    proc = None
                    refused = (PERMANENT, "cannot start %s: %s"
                               % (argv[0], exc.strerror or exc))
                if proc is None and refused is None:
                    refused = (TRANSIENT, "the farm is shutting down")
                if proc is not None:
                    try:
                        exit_code = proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        timed_out = True
                        log.warning("sync timed out: %r after %.0fs",
                                    label, timeout)
                        self._stop_group(proc)
                    finally:
                        self._stop_group(proc, reap_only=True)
            with open(out_path, "rb") as out:
                output = out.read().decode("utf-8", "replace")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        ended = time.time()

        if refused is not None:
            outcome, reason = refused
        else:
            outcome, reason = classify(exit_code, output, timed_out)
        lines = output.splitlines()
        if self.verbose:
            for line in lines:
                log.info("wandb: %r", line)
        return Attempt(started=started, ended=ended, exit_code=exit_code,
                       timed_out=timed_out, outcome=outcome, reason=reason,
                       stderr_tail=lines[-TAIL_LINES:], argv=argv,
                       run_url=find_run_url(output))

    def end_leftovers(self):
        """End syncs a previous farm left running, and their scratch dirs.

        A farm killed with SIGKILL cannot stop its syncs; they would run
        beside the new farm's and send the same run twice.  Returns how
        many process groups were ended.
        """
        ended = 0
        try:
            names = os.listdir(self.work_root)
        except OSError:
            return 0
        for name in names:
            workdir = os.path.join(self.work_root, name)
            try:
                with open(os.path.join(workdir, _PGID_FILE)) as f:
                    pgid = int(f.read().strip())
                with open("/proc/%d/cmdline" % pgid, "rb") as f:
                    cmdline = f.read()
            except (OSError, ValueError):
                cmdline = b""
                pgid = None
            # The pid may have been reused: only a wandb process is ended.
            if pgid and b"wandb" in cmdline:
                log.warning("ending a sync left by a previous farm: "
                            "pgid=%d", pgid)
                _signal_group(pgid, signal.SIGKILL)
                ended += 1
            shutil.rmtree(workdir, ignore_errors=True)
        return ended

    def close(self):
        """Stop every sync under way, live ones included; refuse new ones.

        All groups get SIGTERM at once, then SIGKILL after one grace
        period, so closing takes ``kill_grace`` seconds however many
        syncs run.
        """
        with self._lock:
            self._closed = True
            running = list(self._running)
        for proc in running:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in running:
            self._stop_group(proc, reap_only=True)

    def _spawn(self, argv, workdir, out, env=None):
        with self._lock:
            if self._closed:
                return None
            env = dict(self.environ if env is None else env,
                       WANDB_DIR=workdir)
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, cwd=workdir, env=env,
                start_new_session=True)
            self._running.add(proc)
        # Lets a farm restarted after kill -9 end what it left running.
        with open(os.path.join(workdir, _PGID_FILE), "w") as f:
            f.write("%d\n" % proc.pid)
            return proc

    def _stop_group(self, proc, reap_only=False):
        """End ``proc``'s process group: SIGTERM, then SIGKILL.

        With ``reap_only``, only make sure nothing of the group is left
        after the leader exited by itself.
        """
        # wandb-core, the CLI's service process, starts a session of its
        # own, so the group does not reach it: it is found as a
        # descendant while the CLI still lives.
        others = [] if reap_only else _descendants(proc.pid)
        if not reap_only:
            _signal_group(proc.pid, signal.SIGTERM)
            _signal_each(others, signal.SIGTERM)
            try:
                proc.wait(self.kill_grace)
            except subprocess.TimeoutExpired:
                pass
        # What is left of the group (children of a killed CLI) must not
        # outlast it.
        _signal_group(proc.pid, signal.SIGKILL)
        _signal_each(others, signal.SIGKILL)
        proc.wait()
        with self._lock:
            self._running.discard(proc)


class LiveSync:
    """A running ``wandb beta sync --live`` process, watched from outside.

    Nothing here blocks: the scheduler polls it, reads the lines it
    printed since the last look, and asks it to stop.  ``finish()``
    collects an exited process into an :class:`Attempt`.
    """

    #: Bytes of output kept at most for judging the process at its end.
    tail_bytes = 64 * 1024

    def __init__(self, cli, proc, workdir, out_path, argv):
        self._cli = cli
        self.proc = proc
        self.pid = proc.pid
        self.argv = argv
        self.started = time.time()
        self.error_lines = 0          # wandb ERROR lines printed so far
        self.last_error = None
        self.run_urls = {}            # run id -> its page on W&B
        self._workdir = workdir
        self._out_path = out_path
        self._offset = 0
        self._tail = []
        self._others = []             # descendants outside the group

    def poll(self):
        """The exit code, or None while it runs."""
        return self.proc.poll()

    def read_new_lines(self):
        """Lines printed since the last call (complete lines only)."""
        try:
            with open(self._out_path, "rb") as out:
                out.seek(self._offset)
                data = out.read(1024 * 1024)
        except OSError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        lines = data[:end].decode("utf-8", "replace").splitlines()
        for line in lines:
            if _ERROR_LINE.search(line):
                self.error_lines += 1
                self.last_error = line.strip()[:300]
            match = _RUN_URL.search(line)
            if match:
                self.run_urls[match.group(1)] = match.group(2)
        self._tail = (self._tail + lines)[-TAIL_LINES:]
        if self._cli.verbose:
            for line in lines:
                log.info("wandb live %d: %r", self.pid, line)
        return lines

    def terminate(self):
        self._others = _descendants(self.pid)
        _signal_group(self.pid, signal.SIGTERM)
        _signal_each(self._others, signal.SIGTERM)

    def kill(self):
        _signal_group(self.pid, signal.SIGKILL)
        _signal_each(self._others or _descendants(self.pid), signal.SIGKILL)

    def finish(self):
        """Reap the exited process and judge its whole life as an Attempt.

        A live sync counts as OK only if it exited 0 without ever
        printing an ERROR line: wandb may report lost data mid-way and
        still exit 0.
        """
        self._cli._stop_group(self.proc, reap_only=True)
        self.read_new_lines()
        shutil.rmtree(self._workdir, ignore_errors=True)
        exit_code = self.proc.returncode
        if exit_code == 0 and not self.error_lines:
            outcome, reason = OK, "live sync followed the run to its end"
        elif exit_code is not None and exit_code < 0:
            outcome, reason = TRANSIENT, "live sync ended by signal %d" % (
                -exit_code)
        else:
            outcome, reason = classify(exit_code, "\n".join(
                self._tail + ([self.last_error] if self.last_error
                              else [])))
            if outcome == OK:
                outcome, reason = TRANSIENT, "live sync reported errors"
        return Attempt(started=self.started, ended=time.time(),
                       exit_code=exit_code, timed_out=False,
                       outcome=outcome, reason=reason,
                       stderr_tail=list(self._tail), argv=self.argv)


def _descendants(pid):
    """Pids of every living descendant of ``pid``, from /proc."""
    children = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    found = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


def _signal_each(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


# wandb retries a request to an unreachable or failing server for about
# 16 minutes by default, holding a worker all that time.  The farm has its
# own backoff, so the CLI is asked to give up sooner unless the farm's
# environment says otherwise.
_CHILD_DEFAULTS = {
    "WANDB_X_GRAPHQL_RETRY_MAX": "5",
    "WANDB_X_FILE_STREAM_RETRY_MAX": "5",
}


def _child_environ(environ):
    # WANDB_DIR is set per sync to its scratch directory, where the CLI's
    # debug logs then go and are removed with it.
    env = dict(_CHILD_DEFAULTS)
    env.update(environ)
    # WANDB_SILENT hides the ERROR lines the farm judges attempts by, and
    # a farm started from an offline shell must not pass offline mode on.
    for name in ("WANDB_SILENT", "WANDB_MODE", "WANDB_QUIET"):
        env.pop(name, None)
    return env
