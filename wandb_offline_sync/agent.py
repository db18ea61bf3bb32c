"""The agent: asks the farm to sync this job's run, without getting in its way.

Use it in a training script after ``wandb.init``::

    from wandb_offline_sync import agent
    agent.init(frequency=300)
    ...
    wandb.log(metrics)
    agent.trigger_sync()        # optional: the agent also notices new data

A daemon thread does all the talking.  ``trigger_sync()`` only reads a
clock and, at most once per ``frequency`` seconds, wakes that thread.  The
thread also polls cheaply (one ``stat`` per ``poll_interval``) whether the
run's transaction log grew, so a job that never calls ``trigger_sync()``
is kept in sync too, and notices when the run ends (``wandb.finish()``
or a new ``wandb.init()``).  When the run ends, at interpreter exit and on
SIGTERM (Slurm's time limit), the agent sends a final request, retrying
while the farm is unreachable, for at most ``final_timeout`` seconds.

Nothing here raises into the training job.  Problems are reported once each
as a :class:`FarmWarning` and logged to this module's logger, which has only
a ``NullHandler`` unless ``verbose=True``.  The agent never imports wandb;
it looks at ``sys.modules`` to find the current run.
"""

import atexit
import base64
import http.client
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings

from . import __version__, protocol

__all__ = ["init", "trigger_sync", "finish_sync", "shutdown", "FarmWarning",
           "Agent"]

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

#: Default seconds the final request may take in all, retries included.
DEFAULT_FINAL_TIMEOUT = 5.0


class FarmWarning(UserWarning):
    """Something stops the agent from reaching the farm."""


class _Run:
    """The run the agent is keeping in sync."""

    __slots__ = ("run_dir", "run_id", "wandb_run", "wandb_file",
                 "synced_size", "final_sent", "farm_knows")

    def __init__(self, run_dir, run_id, wandb_run=None):
        self.run_dir = run_dir
        self.run_id = run_id
        self.wandb_run = wandb_run     # wandb's Run object, if followed
        self.wandb_file = None
        if run_id:
            self.wandb_file = os.path.join(run_dir, "run-%s.wandb" % run_id)
        self.synced_size = -1          # log size when last requested
        self.final_sent = False
        self.farm_knows = False        # the farm accepted a request for it

    @classmethod
    def of(cls, wandb_run):
        run_dir = getattr(wandb_run, "sync_dir", None) or \
            os.path.dirname(wandb_run.dir)
        return cls(os.path.abspath(run_dir), wandb_run.id, wandb_run)

    def log_size(self):
        try:
            return os.stat(self.wandb_file).st_size
        except (OSError, TypeError):
            return -1


# What a request's answer means for the agent.
_SENT, _RETRY, _REFUSED = "sent", "retry", "refused"


class Agent:
    """Keeps one job's runs in sync through a farm.

    Use the module functions; this class is public for tests and for
    programs that want more than one agent.
    """

    #: Seconds between the thread's looks at the run's log and state.
    poll_interval = 1.0
    #: First pause between retries of the final request, in seconds.
    final_retry_delay = 0.2
    #: Seconds after which the thread asks again even if the run's log
    #: did not grow, so the farm knows the job is alive (its --stale-after
    #: must be longer than this and than ``frequency``).
    heartbeat_interval = 120.0

    def __init__(self, *, frequency=300.0, address=None, timeout=5.0,
                 final_timeout=DEFAULT_FINAL_TIMEOUT, watch=True,
                 run_dir=None, run_id=None, verbose=False):
        self.frequency = float(frequency)
        self.address = address or protocol.FarmAddress()
        self.timeout = float(timeout)
        self.final_timeout = float(final_timeout)
        self.watch = watch
        self.verbose = verbose
        self.exit_code = None          # set when SIGTERM ends the job
        self.exiting = False           # at_exit has begun
        # Read and written on the hot path without a lock: a float store
        # is atomic, and a lost update only moves one request by a call.
        self._next_due = 0.0
        self._last_post = float("-inf")     # monotonic; thread only
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Guards _warned and each _Run's final_sent.
        self._lock = threading.Lock()
        self._warned = set()
        self._refuse_all = False       # set after a 401: stop asking
        self._final_lock = threading.Lock()   # one final send at a time
        self._explicit = run_dir is not None
        self._run = None
        if run_dir is not None:
            self._run = _Run(os.path.abspath(run_dir),
                             run_id or protocol.run_id_from_dir(run_dir))
        self._url = self.address.url(protocol.SYNC_PATH)
        token = "%s:%s" % (self.address.username, self.address.password)
        self._auth = "Basic " + base64.b64encode(
            token.encode("utf-8")).decode("ascii")
        self._opener = self._make_opener()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="wandb-offline-sync-agent")

    # -- the training loop's side --------------------------------------

    def trigger(self):
        """Ask for a sync if ``frequency`` seconds have passed; never blocks.
        """
        now = time.monotonic()
        if now < self._next_due:
            return
        self._next_due = now + self.frequency
        if not self._wake.is_set():
            self._wake.set()

    # -- lifecycle -----------------------------------------------------

    def start(self):
        self._follow_wandb()
        if self._run is None:
            self._warn("no-run", "no wandb run to follow: call agent.init() "
                       "after wandb.init(), or pass run_dir=")
        self._thread.start()
        return self

    def stop(self):
        """End the thread without sending anything more."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and \
                threading.current_thread() is not self._thread:
            self._thread.join(self.timeout + 1.0)

    def finish(self, exit_code=None):
        """Finish the wandb run if it is still going, then send the final
        request.  Returns True when the farm accepted it."""
        run = self._run
        if run is None:
            return False
        wandb_run = run.wandb_run
        if wandb_run is not None and _current_wandb_run() is wandb_run:
            # Finishing here lets wandb write its exit record (with the
            # exit code it captured, or ours after SIGTERM) before the
            # farm is told the run is complete.
            try:
                wandb_run.finish(exit_code=exit_code)
            except Exception:
                log.debug("wandb finish failed", exc_info=True)
        return self._send_final(run)

    def at_exit(self):
        self.exiting = True
        self._stop.set()
        self._wake.set()
        try:
            self.finish(self.exit_code)
        except Exception:
            log.debug("final request at exit failed", exc_info=True)

    # -- the thread ----------------------------------------------------

    def _loop(self):
        while not self._stop.is_set():
            woken = self._wake.wait(self.poll_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._tick(woken)
            except Exception:
                log.debug("agent step failed", exc_info=True)

    def _tick(self, woken):
        self._follow_wandb()
        run = self._run
        if run is None or run.final_sent:
            return
        size = run.log_size()
        now = time.monotonic()
        if not woken:
            if not self.watch or now < self._next_due:
                return
            recently_asked = now - self._last_post < self.heartbeat_interval
            if size <= run.synced_size and recently_asked:
                return
            self._next_due = now + self.frequency
        run.synced_size = size
        self._last_post = now
        self._post(run, final=False, timeout=self.timeout)

    def _follow_wandb(self):
        """Notice a finished run (send its final) and a new one.

        Known gap: a later run that starts and finishes between two
        looks (``poll_interval``) is never seen, so it gets no sync.  It
        matters only for runs shorter than a second; wandb offers no
        notice of a new run short of wrapping ``wandb.init`` (TODO: use
        one if wandb adds it).
        """
        if self._explicit:
            return
        current = _current_wandb_run()
        tracked = self._run
        if tracked is not None and current is not tracked.wandb_run:
            # wandb clears wandb.run once finish() has written the run's
            # last record, so the run's log is complete now.
            self._send_final(tracked)
            self._run = None
        if current is not None and self._run is None:
            try:
                self._run = _Run.of(current)
            except Exception:
                log.debug("cannot read the run's directory", exc_info=True)
                return
            self._next_due = 0.0
            log.info("following run: run=%s dir=%s", self._run.run_id,
                     self._run.run_dir)

    # -- talking to the farm -------------------------------------------

    def _send_final(self, run):
        with self._final_lock:
            if run.final_sent:
                return True
            deadline = time.monotonic() + self.final_timeout
            delay = self.final_retry_delay
            while True:
                left = deadline - time.monotonic()
                result = self._post(run, final=True,
                                    timeout=max(0.1, min(self.timeout,
                                                         left)))
                if result != _RETRY:
                    break
                if time.monotonic() + delay >= deadline:
                    if run.farm_knows:
                        then = ("the farm will finish the run when it "
                                "notices the job ended")
                    else:
                        then = ("the farm never heard of this run; sync "
                                "it with `wandb sync %s`" % run.run_dir)
                    self._warn("final", "the final sync request for run %s "
                               "was not delivered within %gs; %s"
                               % (run.run_id, self.final_timeout, then))
                    break
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
            run.final_sent = True
            return result == _SENT

    def _post(self, run, *, final, timeout):
        request = protocol.SyncRequest(run.run_dir, run.run_id, final)
        body, content_type = protocol.encode_sync_request(request)
        http_request = urllib.request.Request(
            self._url, data=body, method="POST",
            headers={"Content-Type": content_type,
                     "Authorization": self._auth,
                     "User-Agent": "wandb-offline-sync-agent/"
                                   + __version__})
        if self._refuse_all:
            return _REFUSED
        try:
            with self._opener.open(http_request, timeout=timeout) as answer:
                answer.read(65536)
        except urllib.error.HTTPError as exc:
            return self._refused(exc, run)
        except (urllib.error.URLError, OSError, http.client.HTTPException,
                ssl.SSLError, socket.timeout) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                self._warn("cert-mismatch", "the sync farm at %s did not "
                           "show the certificate in %s=%s (%s); is that "
                           "the farm's cert.pem?" % (
                               self._url, protocol.ENV_CERT,
                               self.address.cert, reason.verify_message))
            else:
                self._warn("unreachable", "cannot reach the sync farm at "
                           "%s (%s); training goes on, the agent keeps "
                           "trying" % (self._url, reason))
            return _RETRY
        run.farm_knows = True
        log.info("sync requested: run=%s final=%s", run.run_id, final)
        with self._lock:
            self._warned.discard("unreachable")
        return _SENT

    def _refused(self, error, run):
        try:
            reason = json.loads(error.read(65536).decode("utf-8"))["error"]
        except Exception:
            reason = error.reason
        if error.code in (429, 502, 503, 504):
            self._warn("busy-%d" % error.code, "the sync farm cannot take "
                       "requests now: %d %s; the agent keeps trying"
                       % (error.code, reason))
            return _RETRY
        hint = ""
        if error.code == 401:
            # Asking again with the same password only locks this node's
            # address out of the farm, for other jobs too.
            self._refuse_all = True
            hint = "; check %s and %s (no more requests from this job)" % (
                protocol.ENV_USERNAME, protocol.ENV_PASSWORD)
        self._warn("refused-%d" % error.code,
                   "the sync farm refused run %s (%s): %d %s%s"
                   % (run.run_id, run.run_dir, error.code, reason, hint))
        return _REFUSED

    def _make_opener(self):
        cert = self.address.cert
        context = None
        if cert:
            try:
                context = ssl.create_default_context(cafile=cert)
                # The farm's certificate is pinned: it is the only trust
                # anchor, so its names need not match the farm's host.
                context.check_hostname = False
            except (OSError, ssl.SSLError) as exc:
                self._warn("cert", "cannot use %s=%s (%s); connecting "
                           "without checking the farm's certificate"
                           % (protocol.ENV_CERT, cert, exc))
        else:
            self._warn("cert", "%s is not set, so the farm's certificate "
                       "is not checked; set it to the path of the farm's "
                       "cert.pem" % protocol.ENV_CERT)
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        # An empty ProxyHandler: the farm is on the cluster's own network
        # and must not be reached through HTTPS_PROXY.
        return urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=context))

    def _warn(self, key, message):
        with self._lock:
            if key in self._warned:
                log.debug("%s", message)
                return
            self._warned.add(key)
        log.warning("%s", message)
        try:
            warnings.warn(message, FarmWarning, stacklevel=2)
        except Exception:
            pass        # warnings configured as errors must not escape


def _current_wandb_run():
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


_agent = None
_agent_lock = threading.Lock()
_warned_before_init = False


def init(frequency=300, timeout=5, force_wait_time=None, decorate=False,
         verbose=False, *, run_dir=None, run_id=None, host=None, port=None,
         username=None, password=None, cert=None, final_timeout=None,
         watch=True, handle_sigterm=True):
    """Start keeping this job's wandb run in sync; call after wandb.init.

    ``frequency``: least seconds between sync requests.  ``timeout``:
    seconds one request may take.  ``final_timeout`` (0.0.14:
    ``force_wait_time``): seconds the final request may take, retries
    included.  ``watch``: also request a sync when the run's log grew
    (``decorate``, which wrapped wandb.log in 0.0.14, now means this).
    ``run_dir``/``run_id``: the run to follow instead of ``wandb.run``.
    ``host``, ``port``, ``username``, ``password``, ``cert``: override
    the ``WANDB_SYNC_FARM_*`` variables.  ``handle_sigterm``: on SIGTERM,
    finish the run and send the final request before exiting (only when
    no other handler is installed).  Returns the Agent, or None if it
    could not start (a FarmWarning says why).
    """
    global _agent
    if final_timeout is None:
        final_timeout = DEFAULT_FINAL_TIMEOUT if force_wait_time is None \
            else force_wait_time
    try:
        if verbose:
            _log_to_stderr()
        address = protocol.FarmAddress(host=host, port=port,
                                       username=username, password=password,
                                       cert=cert)
        new = Agent(frequency=frequency, address=address, timeout=timeout,
                    final_timeout=final_timeout, watch=watch or decorate,
                    run_dir=run_dir, run_id=run_id, verbose=verbose)
        with _agent_lock:
            old, _agent = _agent, None
        if old is not None:
            old.stop()
            atexit.unregister(old.at_exit)
        new.start()
        atexit.register(new.at_exit)
        if handle_sigterm:
            _install_sigterm_handler()
        with _agent_lock:
            _agent = new
        return new
    except Exception as exc:
        warnings.warn("wandb_offline_sync agent not started: %s" % exc,
                      FarmWarning, stacklevel=2)
        return None


def trigger_sync():
    """Ask for a sync if ``frequency`` seconds passed since the last one.

    Costs a clock read when it is not yet time; never blocks or raises.
    """
    agent = _agent
    if agent is None:
        _warn_not_started()
        return
    try:
        agent.trigger()
    except Exception:
        pass


def finish_sync(timeout=None):
    """Send the final request now (the agent also does so by itself).

    Returns True when the farm accepted it.
    """
    agent = _agent
    if agent is None:
        _warn_not_started()
        return False
    try:
        if timeout is not None:
            agent.final_timeout = float(timeout)
        return agent.finish()
    except Exception:
        log.debug("finish_sync failed", exc_info=True)
        return False


def shutdown():
    """Stop the agent without a final request."""
    global _agent
    with _agent_lock:
        old, _agent = _agent, None
    if old is not None:
        old.stop()
        atexit.unregister(old.at_exit)


def _warn_not_started():
    global _warned_before_init
    if not _warned_before_init:
        _warned_before_init = True
        warnings.warn("wandb_offline_sync: trigger_sync() called before "
                      "agent.init(); nothing is synced", FarmWarning,
                      stacklevel=3)


def _install_sigterm_handler():
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm or current is not signal.SIG_DFL:
        return      # ours already, or the job's own: leave it alone
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame):
    # Unwind the main thread like sys.exit would, so atexit runs: wandb
    # finishes the run with this exit code and the final request goes.
    code = 128 + signum
    agent = _agent
    if agent is not None:
        if agent.exiting:
            # The job is already ending and the final request is on its
            # way; raising now would only cut it short.
            return
        agent.exit_code = code
    raise SystemExit(code)


def _log_to_stderr():
    if not any(not isinstance(h, logging.NullHandler)
               for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "wandb_offline_sync: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
