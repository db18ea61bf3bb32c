"""Load on the farm: hundreds of agents asking for syncs at once.

A farm runs as a subprocess on 127.0.0.1 (port 0), in periodic mode, with
``/bin/true`` as its wandb command, so a sync costs a fork and an exec and
nothing else.  Each simulated agent has its own run directory, laid out
as wandb lays out an offline run, and sends ``POST /sync`` over TLS with
the farm's certificate pinned, as the real agent does.  The agents are
threads spread over a few processes, so the load generator is not held to
one core by the GIL; farm and load generator share this machine's cores,
and the report says how much CPU each used.

Two ways to connect are measured:

- agent-like: a new TCP and TLS connection for every request, with
  ``Connection: close``, which is what the agent's urllib opener does;
- keep-alive: each agent keeps one connection open and sends every
  request on it (when paced, it connects before its first request is
  due, so the figures are those of requests on open connections).

``--connect`` picks one of them.  The load generator speaks HTTP over a
bare TLS socket rather than through urllib, so that it leaves as much of
the shared machine as it can to the farm; on the wire, the requests are
the agent's.

Each is measured twice:

1. paced (open loop): every agent sends one request each
   ``agents / rate`` seconds, on a schedule of its own, so the farm is
   offered ``rate`` requests a second whatever its latency.  Latency is
   measured from the moment a request was due, so a late farm cannot
   hide its delay by slowing the senders down; the time from the actual
   send is shown as well.  This is where the targets apply: the offered
   rate is served, p99 below TARGET_P99_MS, no errors.
2. flat out (closed loop): every agent sends its next request as soon as
   the last one is answered.  This shows the most the farm serves here;
   its latency is mostly time spent waiting in line.

Before the measurements every agent sends one request, so the farm knows
every run (its first request also waits for the farm's state file), and
the farm is left to sync each run once.  The runs' logs do not grow
afterwards, so measured requests start no syncs: they measure the HTTPS
front, the path checks and the scheduler's bookkeeping.  ``--grow``
appends to each run's log before each request, so that every request
also asks for a sync.

Every loop is bounded by a count and by time; the whole run takes about a
minute (``--quick``: about 15 seconds, at a rate below the targets).  The
farm's CPU seconds (its own, and its syncs' apart) and its peak RSS come
from ``/proc/<pid>/stat`` and ``/proc/<pid>/status``.  The machine's load
average is printed too: other work on it slows farm and generator alike.
Timing claims are printed, not asserted: the exit status is 0 whatever
the verdicts.

Usage: python bench/load.py [--quick] [--agents N] [--rate R]
           [--processes N] [--connect MODE] [--grow]
"""

import argparse
import base64
import http.client
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from queue import Empty

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

#: Targets for the paced phases.
TARGET_RATE = 340.0
TARGET_P99_MS = 50.0

#: Sizes of the full and the quick run: agents, generator processes,
#: offered requests per second, seconds per paced and flat-out phase.
FULL = dict(agents=500, processes=4, rate=400.0, paced=12.0, flat=6.0)
QUICK = dict(agents=60, processes=2, rate=100.0, paced=2.0, flat=1.0)

#: Seconds a single request may take before it counts as an error.
REQUEST_TIMEOUT = 10.0
#: Seconds the farm may take to sync every run once after the warm-up.
SETTLE_TIMEOUT = 60.0
#: Seconds the farm may take to start and to stop.
FARM_START_TIMEOUT = 60.0
FARM_STOP_TIMEOUT = 15.0

CONNECT_MODES = ("agent-like", "keep-alive")

USERNAME = "bench"
PASSWORD = "bench-password"
TICKS = os.sysconf("SC_CLK_TCK")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short run (about 15 s), for a smoke test")
    parser.add_argument("--agents", type=int, help="simulated agents")
    parser.add_argument("--rate", type=float,
                        help="requests a second offered when paced")
    parser.add_argument("--processes", type=int,
                        help="load generator processes")
    parser.add_argument("--connect", choices=CONNECT_MODES,
                        action="append",
                        help="measure only this way to connect; repeatable")
    parser.add_argument("--grow", action="store_true",
                        help="grow each run's log before each request, so "
                             "every request asks for a sync")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for name in ("agents", "rate", "processes"):
        if getattr(args, name):
            sizes[name] = getattr(args, name)
    sizes["processes"] = max(1, min(sizes["processes"], sizes["agents"]))

    scratch = tempfile.mkdtemp(prefix="farm-load-")
    try:
        return measure(scratch, sizes, args.grow,
                       args.connect or CONNECT_MODES)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure(scratch, sizes, grow, connect_modes):
    started = time.monotonic()
    load_before = _load_average()
    cert, key = make_certificate(scratch)
    run_dirs = make_run_dirs(os.path.join(scratch, "runs"),
                             sizes["agents"])
    farm = FarmProcess(scratch, cert, key)
    farm.start()
    results = []
    try:
        target = dict(port=farm.port, cert=cert, grow=grow)
        warm = run_phase(target, run_dirs, sizes, "keep-alive",
                         rate=None, seconds=60.0, per_agent=1)
        warm["settled"] = farm.wait_settled(cert, SETTLE_TIMEOUT)
        for connect in connect_modes:
            for paced in (True, False):
                before = farm.usage()
                phase = run_phase(
                    target, run_dirs, sizes, connect,
                    rate=sizes["rate"] if paced else None,
                    seconds=sizes["paced"] if paced else sizes["flat"])
                phase["farm"] = farm.usage_since(before)
                phase["paced"] = paced
                results.append(phase)
        status = farm.status(cert)
    finally:
        farm_log = farm.stop()
    report(sizes, grow, warm, results, status, farm, farm_log,
           time.monotonic() - started, load_before)
    return 0


# -- set-up ----------------------------------------------------------------

def make_certificate(folder):
    """A self-signed EC certificate for 127.0.0.1, made with openssl."""
    cert = os.path.join(folder, "cert.pem")
    key = os.path.join(folder, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-subj", "/CN=farm-load", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, timeout=60)
    return cert, key


def make_run_dirs(root, count):
    """One offline run directory per agent, with a small log."""
    run_dirs = []
    for i in range(count):
        run_id = "load%05d" % i
        run_dir = os.path.join(root, "wandb",
                               "offline-run-20261203_120000-%s" % run_id)
        os.makedirs(os.path.join(run_dir, "files"))
        with open(os.path.join(run_dir, "run-%s.wandb" % run_id),
                  "wb") as f:
            f.write(b"\0" * 64)
        run_dirs.append((run_dir, run_id))
    return run_dirs


class FarmProcess:
    """``wandb_sync_farm`` in a subprocess, and what it costs."""

    def __init__(self, scratch, cert, key):
        self.scratch = scratch
        self.argv = [
            sys.executable, "-m", "wandb_offline_sync.farm",
            "--host", "127.0.0.1", "--port", "0", "--cert", cert,
            "--key", key, "--allow-root", os.path.join(scratch, "runs"),
            "--state-dir", os.path.join(scratch, "state"),
            "--wandb-command", "/bin/true", "--mode", "periodic"]
        self.env = dict(os.environ, PYTHONPATH=REPO, HOME=scratch,
                        WANDB_API_KEY="x" * 40,
                        WANDB_SYNC_FARM_USERNAME=USERNAME,
                        WANDB_SYNC_FARM_PASSWORD=PASSWORD)
        self.proc = None
        self.port = None
        self.lines = []
        self._reader = None
        self._listening = threading.Event()

    def start(self):
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=self.scratch,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read_log,
                                        daemon=True)
        self._reader.start()
        if not self._listening.wait(FARM_START_TIMEOUT) or \
                self.port is None:
            self.stop()
            raise SystemExit("the farm did not start:\n"
                             + "".join(self.lines[-20:]))

    def _read_log(self):
        pattern = re.compile(r"listening on https://[^ ]+:(\d+)")
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            if len(self.lines) < 100000:
                self.lines.append(line)
            match = pattern.search(line)
            if match and self.port is None:
                self.port = int(match.group(1))
                self._listening.set()
        self._listening.set()

    def usage(self):
        """(user+system CPU s, children's CPU s) so far."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / TICKS
        children = (int(fields[13]) + int(fields[14])) / TICKS
        return own, children

    def usage_since(self, before):
        now = self.usage()
        return now[0] - before[0], now[1] - before[1]

    def memory(self):
        """Peak and current RSS in MiB."""
        values = {}
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmHWM", "VmRSS"):
                    values[name] = int(rest.split()[0]) / 1024.0
        return values.get("VmHWM", 0.0), values.get("VmRSS", 0.0)

    def status(self, cert):
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=_client_context(cert),
            timeout=REQUEST_TIMEOUT)
        try:
            connection.request("GET", "/status",
                               headers={"Authorization": _auth()})
            answer = connection.getresponse()
            return json.loads(answer.read().decode("utf-8"))
        finally:
            connection.close()

    def wait_settled(self, cert, timeout):
        """Wait until no sync is queued or running; seconds it took, or
        None if it did not settle within ``timeout``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            runs = self.status(cert).get("runs", [])
            if not any(r.get("state") in ("queued", "syncing", "retry_wait")
                       or r.get("follow_up_pending") for r in runs):
                return time.monotonic() - started
            time.sleep(0.5)
        return None

    def stop(self):
        """Stop the farm (SIGTERM, then SIGKILL); return its log lines."""
        if self.proc is None:
            return []
        self.peak_rss, self.rss = self.memory() \
            if self.proc.poll() is None else (0.0, 0.0)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(FARM_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5.0)
        return self.lines


# -- the agents ------------------------------------------------------------

def run_phase(target, run_dirs, sizes, connect, *, rate, seconds,
              per_agent=None):
    """Run every agent in ``sizes["processes"]`` processes; merge results.

    ``rate``: total requests a second, paced; None: flat out.
    ``per_agent``: most requests each agent sends.
    """
    agents = len(run_dirs)
    if per_agent is None:
        if rate:
            per_agent = int(math.ceil(seconds * rate / agents)) + 1
        else:
            per_agent = 10000
    interval = agents / rate if rate else 0.0
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    # Start a moment from now, so every process is ready when it begins.
    start_at = time.time() + 1.0 + 0.2 * sizes["processes"]
    plan = dict(target, connect=connect, interval=interval,
                seconds=seconds, per_agent=per_agent, start_at=start_at)
    workers = []
    for index in range(sizes["processes"]):
        share = run_dirs[index::sizes["processes"]]
        # Agent g is due first at g/agents of an interval: the agents'
        # requests are spread evenly over time.
        offsets = [interval * (index + i * sizes["processes"]) / agents
                   for i in range(len(share))]
        worker = context.Process(target=_worker,
                                 args=(plan, share, offsets, queue),
                                 daemon=True)
        worker.start()
        workers.append(worker)

    merged = dict(connect=connect, rate=rate, latencies=[], due=[],
                  errors={}, sent=0, cpu=0.0, late=[], elapsed=seconds)
    deadline = start_at + seconds + REQUEST_TIMEOUT + 30.0
    for _ in workers:
        left = max(1.0, deadline - time.time())
        try:
            part = queue.get(timeout=left)
        except Empty:
            merged["errors"]["a generator process did not report"] = 1
            break
        merged["latencies"].extend(part["latencies"])
        merged["due"].extend(part["due"])
        merged["late"].extend(part["late"])
        merged["sent"] += part["sent"]
        merged["cpu"] += part["cpu"]
        for name, count in part["errors"].items():
            merged["errors"][name] = merged["errors"].get(name, 0) + count
        merged["elapsed"] = max(merged["elapsed"], part["elapsed"])
    for worker in workers:
        worker.join(10.0)
        if worker.is_alive():
            worker.terminate()
    return merged


def _worker(plan, share, offsets, queue):
    """One load generator process: a thread per agent."""
    context = _client_context(plan["cert"])
    auth = _auth()
    lock = threading.Lock()
    totals = dict(latencies=[], due=[], late=[], errors={}, sent=0)
    start = time.monotonic() + max(0.0, plan["start_at"] - time.time())
    end = start + plan["seconds"]
    threads = [threading.Thread(
        target=_agent, args=(plan, run_dir, run_id, context, auth,
                             start + offset, end, lock, totals),
        daemon=True) for (run_dir, run_id), offset in zip(share, offsets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.1, end - time.monotonic() + REQUEST_TIMEOUT
                        + 5.0))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with lock:
        totals["cpu"] = usage.ru_utime + usage.ru_stime
        totals["elapsed"] = time.monotonic() - start
        queue.put(totals)


def _agent(plan, run_dir, run_id, context, auth, first, end, lock,
           totals):
    keep_alive = plan["connect"] == "keep-alive"
    request = _sync_request(run_dir, run_id, auth, keep_alive)
    address = ("127.0.0.1", plan["port"])
    log_file = os.path.join(run_dir, "run-%s.wandb" % run_id)
    latencies, due_latencies, late, errors = [], [], [], {}
    connection = None
    if keep_alive and plan["interval"]:
        # Paced keep-alive measures requests on open connections: each
        # agent connects before its first request is due.
        try:
            connection = context.wrap_socket(socket.create_connection(
                address, REQUEST_TIMEOUT))
        except OSError as exc:
            name = "connect: " + type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
    due = first
    sent = 0
    while sent < plan["per_agent"]:
        now = time.monotonic()
        if plan["interval"]:
            if due >= end:
                break
            if due > now:
                time.sleep(due - now)
            late.append(max(0.0, time.monotonic() - due))
        elif now >= end:
            break
        if plan["grow"]:
            with open(log_file, "ab") as f:
                f.write(b"\0" * 16)
        began = time.monotonic()
        if not plan["interval"]:
            due = began
        try:
            if connection is None:
                connection = context.wrap_socket(socket.create_connection(
                    address, REQUEST_TIMEOUT))
            connection.sendall(request)
            status, will_close = _read_answer(connection)
            if status != 202:
                name = "HTTP %d" % status
                errors[name] = errors.get(name, 0) + 1
            if not keep_alive or will_close:
                connection.close()
                connection = None
        except (OSError, ValueError) as exc:
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            if connection is not None:
                connection.close()
                connection = None
        done = time.monotonic()
        latencies.append(done - began)
        due_latencies.append(done - due)
        sent += 1
        due += plan["interval"]
    if connection is not None:
        connection.close()
    with lock:
        totals["latencies"].extend(latencies)
        totals["due"].extend(due_latencies)
        totals["late"].extend(late)
        totals["sent"] += sent
        for name, count in errors.items():
            totals["errors"][name] = totals["errors"].get(name, 0) + count


def _sync_request(run_dir, run_id, auth, keep_alive):
    """The bytes of the agent's request, made once."""
    body = json.dumps({"run_dir": run_dir, "run_id": run_id,
                       "final": False}).encode("utf-8")
    lines = ["POST /sync HTTP/1.1", "Host: 127.0.0.1",
             "Content-Type: application/json", "Authorization: " + auth,
             "User-Agent: farm-load", "Content-Length: %d" % len(body)]
    if not keep_alive:
        lines.append("Connection: close")       # as urllib sends
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
_CLOSE = re.compile(rb"\r\nconnection:\s*close", re.I)


def _read_answer(sock):
    """(status, whether the farm closes) of one answer; reads its body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk or len(data) > 65536:
            raise ValueError("no complete answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = _CONTENT_LENGTH.search(head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("answer ended early")
        body += chunk
    return int(head[9:12]), bool(_CLOSE.search(head))


def _client_context(cert):
    # As the agent does with WANDB_SYNC_FARM_CERT: the farm's certificate
    # is the only trust anchor, and its names need not match.
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False
    return context


def _auth():
    token = base64.b64encode(("%s:%s" % (USERNAME, PASSWORD)).encode())
    return "Basic " + token.decode("ascii")


# -- the report ------------------------------------------------------------

def percentile(values, fraction):
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, int(math.ceil(fraction * len(ordered)))
                - 1)
    return ordered[max(0, index)]


def _load_average():
    return "%.1f" % os.getloadavg()[0]


def report(sizes, grow, warm, results, status, farm, farm_log, elapsed,
           load_before):
    runs = status.get("runs", [])
    attempts = sum(r.get("attempts", 0) for r in runs)
    print("farm load: python %s, %d cpus (os.cpu_count) shared by the farm "
          "and the load generator"
          % (platform.python_version(), os.cpu_count()))
    print("%d agents in %d load generator processes; sync command "
          "/bin/true; runs' logs %s"
          % (sizes["agents"], sizes["processes"],
             "grow before each request" if grow else "do not grow"))
    print("warm-up: one request per agent, %d sent, %d errors, p99 %.0f ms"
          % (warm["sent"], sum(warm["errors"].values()),
             1000 * percentile(warm["latencies"], 0.99)))
    if warm["settled"] is None:
        print("the farm was still syncing after %.0f s; measured anyway"
              % SETTLE_TIMEOUT)
    else:
        print("the farm synced every run once %.1f s after the warm-up; "
              "measurements start then" % warm["settled"])
    print()
    print("%-10s %-8s %7s %6s %6s %7s %7s %6s %7s %5s %5s %5s"
          % ("connect", "load", "offered", "served", "p50", "p99",
             "p99 due", "errors", "farm/rq", "farm", "syncs", "gen"))
    for phase in results:
        seconds = phase["elapsed"]
        errors = sum(phase["errors"].values())
        served = (phase["sent"] - errors) / seconds if seconds else 0.0
        farm_cpu, sync_cpu = phase["farm"]
        print("%-10s %-8s %7s %6.0f %6.1f %7.1f %7s %6d %7.2f %4.0f%% "
              "%4.0f%% %4.0f%%"
              % (phase["connect"], "paced" if phase["paced"] else "flat out",
                 "%.0f/s" % phase["rate"] if phase["rate"] else "-", served,
                 1000 * percentile(phase["latencies"], 0.5),
                 1000 * percentile(phase["latencies"], 0.99),
                 "%.1f" % (1000 * percentile(phase["due"], 0.99))
                 if phase["paced"] else "-",
                 errors, 1000 * farm_cpu / max(1, phase["sent"]),
                 100 * farm_cpu / seconds, 100 * sync_cpu / seconds,
                 100 * phase["cpu"] / seconds))
    print()
    print("served: requests answered 202 a second.  p50, p99: ms from the "
          "send to the")
    print("answer; p99 due: ms from the moment it was due (paced only).  "
          "farm/rq: the")
    print("farm's CPU ms per request.  CPU in % of one core: farm = the farm "
          "process,")
    print("syncs = the syncs it ran, gen = all load generator processes.  "
          "Farm and load")
    print("generator share this machine's %d cores; load average %s at the "
          "start," % (os.cpu_count(), load_before))
    print("%s at the end (other work on the machine slows both)."
          % _load_average())
    for phase in results:
        if phase["errors"]:
            print("errors, %s %s: %s" % (
                phase["connect"], "paced" if phase["paced"] else "flat out",
                ", ".join("%s x%d" % item
                          for item in sorted(phase["errors"].items()))))
    print()
    print("farm: peak RSS %.0f MiB (%.0f MiB at the end); knows %d runs, "
          "ran %d syncs" % (farm.peak_rss, farm.rss, len(runs), attempts))
    warnings = [line.rstrip() for line in farm_log
                if " WARNING " in line or " ERROR " in line]
    print("farm log: %d lines, %d warnings or errors"
          % (len(farm_log), len(warnings)))
    for line in warnings[:5]:
        print("  " + line[:150])
    print()
    for phase in results:
        if not phase["paced"]:
            continue
        seconds = phase["elapsed"]
        errors = sum(phase["errors"].values())
        served = (phase["sent"] - errors) / seconds if seconds else 0.0
        p99 = 1000 * percentile(phase["due"], 0.99)
        late = 1000 * percentile(phase["late"] or [0.0], 0.99)
        if phase["rate"] < TARGET_RATE:
            verdict = "not judged: %.0f/s offered" % phase["rate"]
        elif served >= TARGET_RATE and p99 < TARGET_P99_MS and not errors:
            verdict = "met"
        else:
            verdict = "NOT met"
        print("%-10s paced: %.0f requests/s (target >= %.0f), p99 from due "
              "%.1f ms (target < %.0f), %d errors: %s"
              % (phase["connect"], served, TARGET_RATE, p99, TARGET_P99_MS,
                 errors, verdict))
        print("%-10s (the generator itself sent its requests up to %.1f ms "
              "late, p99)" % ("", late))
    print("Took %.1f s." % elapsed)


if __name__ == "__main__":
    sys.exit(main())
