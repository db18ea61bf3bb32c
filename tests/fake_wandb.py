"""A fake Weights & Biases server on 127.0.0.1, for tests.

It speaks just enough of the W&B HTTP API that the real `wandb sync` and
`wandb beta sync --live` (wandb 0.31.0) upload an offline run to it and
exit cleanly, and it records what arrived so that tests can ask for it:

- ``POST /graphql``: ``UpsertBucket`` (run id, config), ``ServerFeatures
  Query`` (no features), ``CreateRunFiles`` (upload URLs that point back
  here), ``RunResumeStatus`` (always a new run).  Any other operation gets
  ``{"data": {}}`` and its name is recorded in ``unknown_operations()``.
- ``POST /files/<entity>/<project>/<run>/file_stream``: history rows,
  summary, and the ``complete``/``exitcode`` state of each post.
- ``PUT /_upload/<run>/<name>``: file uploads; only the names are kept.
- Anything else (telemetry under ``/sdk/otel/``, ...): 200 ``{"data":
  {}}``.

Point the CLI at it with ``WANDB_BASE_URL=server.url`` and any
``WANDB_API_KEY`` of 40 characters from ``[A-Za-z0-9_]``.

Left out on purpose: authentication (any key is accepted), artifacts
(an empty answer to ``CreateArtifact`` makes the CLI crash), resuming an
existing run, console output and system metrics (received, not kept), the
content of uploaded files, and HTTPS.  ``set_failure()`` answers every
request with one status code, to script outages; finer faults (a hang, a
failure on one endpoint only) would need a hook here.
"""

import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["FakeWandbServer", "ENTITY", "unwrap_config", "API_KEY",
           "FAST_FAILURE", "isolated_environ"]

_log = logging.getLogger(__name__)

# Entity given to runs that do not name one; without an entity name in
# the UpsertBucket answer the CLI files the run under an empty entity.
ENTITY = "fake-entity"

API_KEY = "fake_key_" + "0" * 31  # 40 characters, as the CLI demands

# Give up after one retry, a second apart, so that a fake that breaks the
# CLI fails the test in seconds instead of the default quarter hour.
# Fractions of a second are ignored by wandb 0.31.0 (default backoff).
FAST_FAILURE = {
    "WANDB_X_GRAPHQL_RETRY_MAX": "1",
    "WANDB_X_GRAPHQL_RETRY_WAIT_MIN_SECONDS": "1",
    "WANDB_X_GRAPHQL_RETRY_WAIT_MAX_SECONDS": "1",
    "WANDB_X_FILE_STREAM_RETRY_MAX": "1",
    "WANDB_X_FILE_STREAM_RETRY_WAIT_MIN_SECONDS": "1",
    "WANDB_X_FILE_STREAM_RETRY_WAIT_MAX_SECONDS": "1",
}


def isolated_environ(root):
    """os.environ without WANDB_*, with every wandb folder under root."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("WANDB_")}
    environ.update(
        HOME=os.path.join(root, "home"),
        WANDB_MODE="offline",
        WANDB_DIR=os.path.join(root, "runs"),
        WANDB_CONFIG_DIR=os.path.join(root, "config"),
        WANDB_CACHE_DIR=os.path.join(root, "cache"),
        WANDB_DATA_DIR=os.path.join(root, "data"),
    )
    for key in ("HOME", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                "WANDB_DATA_DIR"):
        os.makedirs(environ[key], exist_ok=True)
    return environ


_HISTORY_FILE = "wandb-history.jsonl"
_SUMMARY_FILE = "wandb-summary.json"
_UPLOAD_PREFIX = "/_upload/"


def unwrap_config(config):
    """Return config with wandb's ``{"value": x}`` wrappers replaced by x.

    Keys that are not wrapped (such as ``_wandb``) are left out.
    """
    return {
        key: item["value"]
        for key, item in config.items()
        if isinstance(item, dict) and "value" in item
    }


@dataclasses.dataclass
class _Run:
    """What the server has received for one run id."""

    arrivals: list = dataclasses.field(default_factory=list)  # (t, row)
    offsets: list = dataclasses.field(default_factory=list)
    history_bytes: int = 0
    summary: dict = dataclasses.field(default_factory=dict)
    config: dict = dataclasses.field(default_factory=dict)
    states: list = dataclasses.field(default_factory=list)
    state_times: list = dataclasses.field(default_factory=list)
    uploads: list = dataclasses.field(default_factory=list)


class _BadRequest(Exception):
    """The request cannot be understood; answered with 400."""


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so the Go client can keep connections alive; every answer
    # therefore carries a Content-Length.
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self._serve()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST

    def log_message(self, format, *args):
        # Keep test output clean; the path is client text, so use %r.
        _log.debug("fake wandb: %s %r", self.address_string(),
                   format % args)

    def _serve(self):
        fake = self.server.fake
        try:
            body = self._read_body()
            status, answer = fake._answer(self.command, self.path, body)
        except _BadRequest as exc:
            status, answer = 400, {"errors": [{"message": str(exc)}]}
        fake._note_request(self.command, self.path, status)
        self._reply(status, answer)

    def _read_body(self):
        # wandb 0.31.0 sends plain bodies with a Content-Length, even with
        # WANDB_X_FILE_STREAM_NO_GZIP=false.  Anything else would leave
        # unread bytes on a keep-alive connection, so refuse and close.
        if "Transfer-Encoding" in self.headers or (
                "Content-Encoding" in self.headers):
            self.close_connection = True
            raise _BadRequest("chunked or encoded bodies are not supported")
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length)

    def _reply(self, status, answer):
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    """Keeps the open connections, so that stop() can cut them.

    Without this a keep-alive connection would go on being served by its
    handler thread after shutdown(), and a "server down" test would not
    be one.
    """

    daemon_threads = True

    def __init__(self, fake):
        self.fake = fake
        self._connections = set()  # guarded by _connections_lock
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request_thread(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def handle_error(self, request, client_address):
        # The CLI resets idle keep-alive connections when it exits.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            _log.debug("fake wandb: connection dropped: %s", exc)
        else:
            _log.exception("fake wandb: handler failed: client=%s",
                           client_address)

    def cut_connections(self):
        with self._connections_lock:
            connections = list(self._connections)
        for request in connections:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client


class FakeWandbServer:
    """A recording fake W&B server; use as a context manager."""

    def __init__(self):
        # Guards everything recorded below and fail_status; wait_for()
        # sleeps on it.  Reentrant, so a wait_for() predicate may call
        # the accessors.
        self._cond = threading.Condition(threading.RLock())
        self._runs = {}  # run id -> _Run, in order first seen
        self._requests = []  # (method, path, status)
        self._unknown_operations = []
        self.fail_status = None  # answer everything with this, if set
        self.url = None
        self._server = None
        self._thread = None

    def start(self):
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-wandb-{port}",
            daemon=True,
        )
        self._thread.start()
        _log.info("fake wandb: started url=%s", self.url)
        return self

    def stop(self):
        if self._server is None:
            return
        self._server.shutdown()
        self._server.cut_connections()
        self._server.server_close()
        self._thread.join()
        self._server = None
        _log.info("fake wandb: stopped url=%s", self.url)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- fault injection -------------------------------------------------

    def set_failure(self, status):
        """Answer every request with status (None: serve normally)."""
        with self._cond:
            self.fail_status = status

    # -- what arrived ----------------------------------------------------

    def runs(self):
        with self._cond:
            return list(self._runs)

    def history(self, run_id):
        """History rows in arrival order, re-sent rows included."""
        return [row for _, row in self.history_arrivals(run_id)]

    def history_steps(self, run_id):
        return [row.get("_step") for row in self.history(run_id)]

    def history_arrivals(self, run_id):
        """(time.time() at arrival, row) for each history row."""
        with self._cond:
            return list(self._run(run_id).arrivals)

    def history_offsets(self, run_id):
        """The offset of each file_stream post that carried history."""
        with self._cond:
            return list(self._run(run_id).offsets)

    def history_bytes(self, run_id):
        """Total UTF-8 length of history lines, newlines not counted."""
        with self._cond:
            return self._run(run_id).history_bytes

    def summary(self, run_id):
        with self._cond:
            return dict(self._run(run_id).summary)

    def config(self, run_id):
        """The latest config sent, as wandb sends it ({"value": ...})."""
        with self._cond:
            return dict(self._run(run_id).config)

    def config_values(self, run_id):
        """The latest config with the {"value": ...} wrappers removed."""
        return unwrap_config(self.config(run_id))

    def states(self, run_id):
        """{"complete", "exitcode"} of each file_stream post with either."""
        with self._cond:
            return [dict(s) for s in self._run(run_id).states]

    def state_arrivals(self, run_id):
        """(time.time() at arrival, state) for each of states()."""
        with self._cond:
            run = self._run(run_id)
            return [(when, dict(state))
                    for when, state in zip(run.state_times, run.states)]

    def final_state(self, run_id):
        states = self.states(run_id)
        return states[-1] if states else None

    def uploads(self, run_id):
        with self._cond:
            return list(self._run(run_id).uploads)

    def requests(self):
        """(method, path, status) of every request, failed ones too."""
        with self._cond:
            return list(self._requests)

    def unknown_operations(self):
        """Names of graphql operations this fake does not know."""
        with self._cond:
            return list(self._unknown_operations)

    def wait_for(self, predicate, timeout):
        """Wait until predicate(self) is true; False if timeout passed."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    # -- serving (called from handler threads) ----------------------------

    def _run(self, run_id):
        # A run not seen yet reads as empty without being recorded.
        return self._runs.get(run_id) or _Run()

    def _run_for_update(self, run_id):
        return self._runs.setdefault(run_id, _Run())

    def _note_request(self, method, path, status):
        with self._cond:
            self._requests.append((method, path, status))
            self._cond.notify_all()

    def _answer(self, method, raw_path, body):
        """Record one request; return (status, JSON answer)."""
        with self._cond:
            status = self.fail_status
        if status is not None:
            # The CLI prints this message after "wandb: ERROR ".
            message = "fake wandb: injected failure"
            return status, {"errors": [{"message": message}]}

        path = urllib.parse.urlsplit(raw_path).path
        if method == "POST" and path == "/graphql":
            return 200, self._graphql(_decode_json(body))
        if method == "POST" and path.endswith("/file_stream"):
            parts = path.strip("/").split("/")
            if len(parts) != 5 or parts[0] != "files":
                raise _BadRequest(f"bad file_stream path: {path!r}")
            self._file_stream(parts[3], _decode_json(body))
            return 200, {}
        if method == "PUT" and path.startswith(_UPLOAD_PREFIX):
            run_id, _, name = path[len(_UPLOAD_PREFIX):].partition("/")
            with self._cond:
                run = self._run_for_update(run_id)
                run.uploads.append(urllib.parse.unquote(name))
                self._cond.notify_all()
            return 200, {}
        return 200, {"data": {}}

    def _graphql(self, request):
        operation = request.get("operationName")
        variables = request.get("variables") or {}

        if operation == "UpsertBucket":
            return self._upsert_bucket(variables)
        if operation == "ServerFeaturesQuery":
            return {"data": {"serverInfo": {"features": []}}}
        if operation == "CreateRunFiles":
            run_id = variables.get("run", "")
            files = [
                {"name": name, "uploadUrl": self._upload_url(run_id, name)}
                for name in variables.get("files") or []
            ]
            return {"data": {"createRunFiles": {
                "runID": run_id, "uploadHeaders": [], "files": files}}}
        if operation == "RunResumeStatus":
            return {"data": {"model": None}}

        with self._cond:
            self._unknown_operations.append(operation)
            self._cond.notify_all()
        _log.debug("fake wandb: unknown graphql operation %r", operation)
        return {"data": {}}

    def _upsert_bucket(self, variables):
        run_id = variables.get("name") or variables.get("id") or "run"
        project = variables.get("project") or "uncategorized"
        entity = variables.get("entity") or ENTITY
        config = variables.get("config")
        decoded = None if config is None else _decode_json(config)

        with self._cond:
            run = self._run_for_update(run_id)
            if decoded is not None:
                run.config = decoded
            self._cond.notify_all()

        return {"data": {"upsertBucket": {"inserted": True, "bucket": {
            "id": run_id,
            "name": run_id,
            "displayName": variables.get("displayName") or run_id,
            "description": variables.get("description"),
            "config": config,
            "sweepName": None,
            "historyLineCount": 0,
            "project": {
                "id": project,
                "name": project,
                "entity": {"id": entity, "name": entity},
            },
        }}}}

    def _upload_url(self, run_id, name):
        quoted = urllib.parse.quote(name)
        return f"{self.url}{_UPLOAD_PREFIX}{run_id}/{quoted}"

    def _file_stream(self, run_id, post):
        now = time.time()
        files = post.get("files") or {}
        history = files.get(_HISTORY_FILE)
        lines = (history or {}).get("content") or []
        rows = [_decode_json(line) for line in lines]
        summaries = [_decode_json(line) for line in
                     (files.get(_SUMMARY_FILE) or {}).get("content") or []]

        with self._cond:
            run = self._run_for_update(run_id)
            if history:
                run.offsets.append(history.get("offset"))
                run.arrivals.extend((now, row) for row in rows)
                run.history_bytes += sum(len(s.encode()) for s in lines)
            for summary in summaries:
                run.summary.update(summary)
            if "complete" in post or "exitcode" in post:
                run.states.append({
                    "complete": post.get("complete"),
                    "exitcode": post.get("exitcode"),
                })
                run.state_times.append(now)
            self._cond.notify_all()


def _decode_json(text):
    """Decode a JSON object (a body, a history line, a config)."""
    try:
        value = json.loads(text or b"{}")
    except ValueError as exc:
        raise _BadRequest(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _BadRequest(f"not a JSON object: {text[:80]!r}")
    return value
