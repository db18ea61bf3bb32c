"""Hostile clients against a real farm: every one is refused or dropped,
nothing runs, and the farm keeps serving.

The table drives raw bytes over real TLS (or plain TCP) to a farm on
127.0.0.1, so requests that http.client would refuse to build can be
sent.  Each row says what the farm must answer: an HTTP status with a
JSON ``{"error": reason}`` body, or ``CLOSED`` when the farm is expected
to drop the connection.  After every row the farm must still answer a
good ``GET /status``, and no run may have been recorded or synced.
"""

import base64
import http.client
import json
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from urllib.parse import urlencode

import pytest

from wandb_offline_sync import protocol
from wandb_offline_sync.server import FarmHandler

from conftest import PASSWORD, USERNAME, make_run_dir, wait_until

CLOSED = "connection closed"
STILL_OPEN = "connection still open"


def _basic(username, password):
    token = base64.b64encode(("%s:%s" % (username, password)).encode())
    return "Basic " + token.decode("ascii")


GOOD_AUTH = _basic(USERNAME, PASSWORD)


# -- the filesystem a row may point at ----------------------------------

class Tree:
    """An allowed root and an outside folder, with run directories made
    on demand for the row that needs them."""

    def __init__(self, base):
        self.root = os.path.join(str(base), "allowed")
        self.outside = os.path.join(str(base), "outside")
        os.makedirs(self.root)
        os.makedirs(self.outside)

    def run(self, run_id="good1"):
        """A valid run directory under the allowed root."""
        return make_run_dir(self.root, run_id)

    def outside_run(self, run_id="away1"):
        """A valid run directory outside every allowed root."""
        return make_run_dir(self.outside, run_id)

    def symlinked_run(self):
        link = os.path.join(self.root, "wandb", "offline-run-link")
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(self.outside_run(), link)
        return link

    def run_with_symlinked_log(self):
        run_dir = os.path.join(self.root, "wandb",
                               "offline-run-20261203_120000-sym2")
        os.makedirs(run_dir)
        away = os.path.join(self.outside_run("sym2"), "run-sym2.wandb")
        os.symlink(away, os.path.join(run_dir, "run-sym2.wandb"))
        return run_dir

    def link_to_outside_log(self):
        link = os.path.join(self.root, "run-sym3.wandb")
        os.symlink(os.path.join(self.outside_run("sym3"), "run-sym3.wandb"),
                   link)
        return link

    def run_with_logs(self, count):
        run_dir = os.path.join(self.root, "wandb",
                               "offline-run-20261203_120000-n%d" % count)
        os.makedirs(run_dir)
        for i in range(count):
            open(os.path.join(run_dir, "run-n%d.wandb" % i), "wb").close()
        return run_dir

    def foreign_run(self):
        run_dir = self.run("foreign1")
        os.chown(run_dir, 12345, 12345)
        return run_dir

    def run_with_foreign_log(self):
        run_dir = self.run("foreign2")
        os.chown(os.path.join(run_dir, "run-foreign2.wandb"), 12345, 12345)
        return run_dir

    def run_with_odd_log(self, kind):
        run_dir = os.path.join(self.root, "wandb",
                               "offline-run-20261203_120000-odd")
        os.makedirs(run_dir)
        log_path = os.path.join(run_dir, "run-odd.wandb")
        if kind == "fifo":
            os.mkfifo(log_path)
        else:
            os.mkdir(log_path)
        return run_dir

    def plain_file(self):
        path = os.path.join(self.root, "notes.txt")
        with open(path, "w") as f:
            f.write("not a run\n")
        return path

    def symlink_loop(self):
        first = os.path.join(self.root, "loop-a")
        second = os.path.join(self.root, "loop-b")
        os.symlink(second, first)
        os.symlink(first, second)
        return first


# -- building requests ---------------------------------------------------

def raw(method, path, body=b"", headers=(), auth=GOOD_AUTH,
        content_length=True, version="HTTP/1.1"):
    """The bytes of one request, built without any checks."""
    lines = ["%s %s %s" % (method, path, version), "Host: 127.0.0.1"]
    if auth is not None:
        lines.append("Authorization: " + auth)
    lines.extend("%s: %s" % pair for pair in headers)
    if content_length and body is not None:
        lines.append("Content-Length: %d" % len(body))
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body or b"")


def add_header(data, name, value):
    """``data`` with one more header line, after all the others."""
    head, sep, body = data.partition(b"\r\n\r\n")
    line = ("\r\n%s: %s" % (name, value)).encode("latin-1")
    return head + line + sep + body


def sync_json(fields, **kw):
    body = json.dumps(fields).encode("utf-8")
    return sync_bytes(body, "application/json", **kw)


def sync_bytes(body, content_type="application/json", **kw):
    headers = list(kw.pop("headers", ()))
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    return raw("POST", protocol.SYNC_PATH, body, headers=headers, **kw)


def sync_form(text):
    return sync_bytes(text.encode("utf-8"),
                      "application/x-www-form-urlencoded")


def sync_dir(run_dir, **kw):
    return sync_json({"run_dir": run_dir}, **kw)


# -- talking to the farm -------------------------------------------------

def tls_connect(port, cert, timeout):
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False
    sock = socket.create_connection(("127.0.0.1", port), timeout)
    try:
        return context.wrap_socket(sock)
    except BaseException:
        sock.close()
        raise


def read_answer(sock, method="POST"):
    """(status, headers, payload) of the farm's answer, or CLOSED."""
    response = http.client.HTTPResponse(sock, method=method)
    try:
        response.begin()
        data = response.read()
    except socket.timeout:
        return STILL_OPEN
    except (http.client.HTTPException, ConnectionError, ssl.SSLError):
        return CLOSED
    try:
        payload = json.loads(data.decode("utf-8"))
    except ValueError:
        payload = data
    return response.status, response.headers, payload


def exchange(port, cert, data, timeout=10):
    """Send ``data`` over TLS and read one answer."""
    method = data.split(b" ", 1)[0].decode("latin-1")
    with tls_connect(port, cert, timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass        # dropped while sending; an answer may be waiting
        return read_answer(sock, method)


def wait_closed(sock, timeout):
    """CLOSED once the peer ends the connection, else STILL_OPEN.

    Reads without blocking: a TLS socket is readable for records that
    carry no data (session tickets), and a blocking read would then
    stall the caller past the farm's timeouts.
    """
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    sock.settimeout(0)
    try:
        while True:
            try:
                if not sock.recv(4096):
                    return CLOSED
            except (ssl.SSLWantReadError, BlockingIOError):
                pass
            except (OSError, ssl.SSLError):
                return CLOSED
            left = deadline - time.monotonic()
            if left <= 0:
                return STILL_OPEN
            select.select([sock], [], [], left)
    finally:
        sock.settimeout(previous)


# Transport rows: each is a function (port, cert) -> CLOSED or not.

def plain_http(port, cert):
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(raw("GET", protocol.STATUS_PATH))
        return wait_closed(sock, 5)


def not_tls_at_all(port, cert):
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(os.urandom(64) + b"\r\n\r\n")
        return wait_closed(sock, 5)


def silent_tcp(port, cert):
    # handshake_timeout is 1 s for this row; the default is 10 s.
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        return wait_closed(sock, 5)


def silent_tls(port, cert):
    # FarmHandler.timeout is 1 s for this row; the default is 20 s.
    with tls_connect(port, cert, 5) as sock:
        return wait_closed(sock, 5)


def slow_tls_headers(port, cert):
    """One byte of a header every 0.1 s: each byte comes well within the
    handler's timeout, but the request as a whole never does."""
    head = raw("GET", protocol.STATUS_PATH,
               headers=[("X-Slow", "a" * 100)])[:-2]
    deadline = time.monotonic() + 6
    with tls_connect(port, cert, 5) as sock:
        for byte in head:
            if time.monotonic() > deadline:
                return STILL_OPEN
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return CLOSED
            if wait_closed(sock, 0.1) == CLOSED:
                return CLOSED
    return STILL_OPEN


def slow_tls_hello(port, cert):
    """A TLS ClientHello one byte every 0.1 s: the handshake as a whole
    must end at the farm's handshake timeout."""
    outgoing = ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    deadline = time.monotonic() + 6
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        for byte in hello:
            if time.monotonic() > deadline:
                return STILL_OPEN
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return CLOSED
            if wait_closed(sock, 0.1) == CLOSED:
                return CLOSED
    return STILL_OPEN


def half_body(port, cert):
    """A body that stops short of its Content-Length and never ends."""
    data = sync_bytes(b'{"run_dir": "/x"}')[:-5]
    with tls_connect(port, cert, 5) as sock:
        sock.sendall(data)
        answer = read_answer(sock)
    return answer


# -- the table -----------------------------------------------------------

def row(request, expect, name, slow_timeouts=False):
    """``request``: Tree -> bytes, or a transport function."""
    return pytest.param(request, expect, slow_timeouts, id=name)


LONG = "x" * 10000

HOSTILE = [
    # Malformed JSON bodies and wrong types.
    row(lambda t: sync_bytes(b"{not json"), 400, "json-malformed"),
    row(lambda t: sync_bytes(b"[1, 2]"), 400, "json-array"),
    row(lambda t: sync_bytes(b'"/abs"'), 400, "json-string"),
    row(lambda t: sync_bytes(b"null"), 400, "json-null"),
    row(lambda t: sync_json({"run_dir": 5}), 400, "run_dir-number"),
    row(lambda t: sync_json({"run_dir": [t.run()]}), 400, "run_dir-list"),
    row(lambda t: sync_json({"run_dir": None}), 400, "run_dir-null"),
    row(lambda t: sync_json({"run_dir": ""}), 400, "run_dir-empty"),
    row(lambda t: sync_json({"run_id": "abc"}), 400, "run_dir-missing"),
    row(lambda t: sync_json({}), 400, "json-empty-object"),
    row(lambda t: sync_bytes(b""), 400, "body-empty"),
    row(lambda t: sync_json({"run_dir": "wandb/offline-run-x"}), 400,
        "run_dir-relative"),
    row(lambda t: sync_json({"run_dir": t.run() + "\x00/x"}), 400,
        "run_dir-nul"),
    row(lambda t: sync_json({"run_dir": "/" + "a" * 5000}), 400,
        "run_dir-too-long"),
    row(lambda t: sync_json({"run_dir": t.root + "/\ud800"}), 400,
        "run_dir-lone-surrogate"),
    row(lambda t: sync_json({"run_dir": t.run(), "run_id": "../x"}), 400,
        "run_id-traversal"),
    row(lambda t: sync_json({"run_dir": t.run(), "run_id": "abc\n"}), 400,
        "run_id-trailing-newline"),
    row(lambda t: sync_json({"run_dir": t.run(), "run_id": 7}), 400,
        "run_id-number"),
    row(lambda t: sync_json({"run_dir": t.run(), "run_id": "a" * 129}),
        400, "run_id-too-long"),
    row(lambda t: sync_json({"run_dir": t.run(), "final": "maybe"}), 400,
        "final-string"),
    row(lambda t: sync_json({"run_dir": t.run(), "final": 1}), 400,
        "final-number"),
    row(lambda t: sync_bytes(b"[" * 8000 + b"]" * 8000), 400,
        "json-nested-deeply"),
    row(lambda t: sync_bytes(b'{"run_dir": "/\xff\xfe"}'), 400,
        "json-invalid-utf8"),
    row(lambda t: sync_bytes(b'{"n": ' + b"9" * 6000 + b"}"), 400,
        "json-huge-integer"),
    # Form bodies of old agents.
    row(lambda t: sync_form("run_dir"), 400, "form-no-equals"),
    row(lambda t: sync_form(urlencode([("run_dir", t.run()),
                                       ("run_dir", "/etc")])), 400,
        "form-duplicate-field"),
    row(lambda t: sync_form("&".join("f%d=1" % i for i in range(40))), 400,
        "form-too-many-fields"),
    row(lambda t: sync_form(urlencode({"run_dir": t.run(),
                                       "final": "maybe"})), 400,
        "form-final-maybe"),
    row(lambda t: sync_form("run_dir=/%ff%fe"), 403,
        "form-invalid-percent-utf8"),
    row(lambda t: sync_bytes(b"run_dir=/x", "text/plain"), 400,
        "content-type-unsupported"),
    # Huge bodies.
    row(lambda t: sync_bytes(b'{"run_dir": "/' + b"x" * 100000 + b'"}'),
        413, "body-100kB"),
    row(lambda t: sync_bytes(None, headers=[("Content-Length",
                                             "5000000")]),
        413, "body-5MB-declared"),
    # Absurd headers.
    row(lambda t: sync_bytes(None, headers=[("Content-Length", "ten")]),
        400, "content-length-not-a-number"),
    row(lambda t: sync_bytes(None, headers=[("Content-Length", "-5")]),
        400, "content-length-negative"),
    row(lambda t: sync_bytes(None, headers=[("Content-Length", "1_0")]),
        400, "content-length-underscore"),
    row(lambda t: add_header(sync_dir(t.run()), "Content-Length", "2"),
        400, "content-length-duplicate-differing"),
    row(lambda t: add_header(sync_dir(t.run()), "Content-Length", "0"),
        400, "content-length-duplicate-zero"),
    row(lambda t: sync_bytes(None, headers=[("Transfer-Encoding",
                                             "chunked")])
        + b"2\r\n{}\r\n0\r\n\r\n", 411, "transfer-encoding-chunked"),
    row(lambda t: sync_bytes(None), 411, "content-length-missing"),
    row(lambda t: sync_dir(t.outside_run(), headers=[("X-Junk", LONG)]),
        403, "header-value-10k"),
    row(lambda t: sync_dir(t.run(), headers=[("X-Junk", "x" * 70000)]),
        431, "header-line-over-64k"),
    row(lambda t: sync_dir(t.run(), headers=[("X-H%d" % i, "v")
                                             for i in range(200)]),
        431, "headers-200"),
    row(lambda t: raw("GET", "/" + "a" * 70000), 414, "request-line-70k"),
    row(lambda t: raw("GET", protocol.STATUS_PATH, version="HTTP/9.9"),
        505, "http-version-9.9"),
    row(lambda t: raw("GET", protocol.STATUS_PATH, version="HTTP/one"),
        400, "http-version-malformed"),
    row(lambda t: b"GET /status HTTP/1.1 and more\r\n\r\n", 400,
        "request-line-four-words"),
    # Unknown methods and paths.
    row(lambda t: sync_dir(t.run()).replace(b"POST", b"BREW", 1), 405,
        "method-made-up"),
    row(lambda t: sync_dir(t.run()).replace(b"POST", b"PUT", 1), 405,
        "method-put"),
    row(lambda t: raw("GET", protocol.SYNC_PATH), 405, "method-get-sync"),
    row(lambda t: raw("GET", "/etc/passwd"), 404, "path-unknown"),
    row(lambda t: raw("GET", "/sync/../status"), 404, "path-dot-dot"),
    row(lambda t: raw("POST", "https://evil.example/sync", b"{}"), 404,
        "path-absolute-url"),
    # Credentials, with an otherwise good request for a good run.
    row(lambda t: sync_dir(t.run(), auth=None), 401, "auth-none"),
    row(lambda t: sync_dir(t.run(), auth=_basic(USERNAME, "wrong")), 401,
        "auth-wrong-password"),
    row(lambda t: sync_dir(t.run(), auth=_basic("root", PASSWORD)), 401,
        "auth-wrong-user"),
    row(lambda t: sync_dir(t.run(), auth="Basic !!!not-base64!!!"), 401,
        "auth-bad-base64"),
    row(lambda t: sync_dir(t.run(), auth="Basic " + base64.b64encode(
        (USERNAME + PASSWORD).encode()).decode()), 401, "auth-no-colon"),
    row(lambda t: sync_dir(t.run(), auth="Bearer " + PASSWORD), 401,
        "auth-bearer"),
    row(lambda t: sync_dir(t.run(), auth=GOOD_AUTH + "A" * 10000), 401,
        "auth-huge-header"),
    row(lambda t: sync_dir(t.run(), auth="Basic \xe9\xe8=="), 401,
        "auth-not-ascii"),
    row(lambda t: sync_dir(t.run(), auth="Basic"), 401, "auth-empty"),
    # Paths the policy must refuse.
    row(lambda t: sync_dir(t.root + "/../outside/" + os.path.relpath(
        t.outside_run(), t.outside)), 403, "path-traversal"),
    row(lambda t: sync_dir(t.outside_run()), 403, "path-outside-roots"),
    row(lambda t: sync_dir("/etc"), 403, "path-etc"),
    row(lambda t: sync_dir(t.symlinked_run()), 403, "symlinked-run-dir"),
    row(lambda t: sync_dir(t.run_with_symlinked_log()), 403,
        "symlinked-wandb-file"),
    row(lambda t: sync_dir(t.link_to_outside_log()), 403,
        "link-to-outside-wandb-file"),
    row(lambda t: sync_dir(t.run_with_logs(0)), 404, "no-wandb-file"),
    row(lambda t: sync_dir(t.run_with_logs(2)), 404, "two-wandb-files"),
    row(lambda t: sync_dir(t.foreign_run()), 403, "foreign-owner-dir"),
    row(lambda t: sync_dir(t.run_with_foreign_log()), 403,
        "foreign-owner-wandb-file"),
    row(lambda t: sync_dir(t.run_with_odd_log("fifo")), 403,
        "wandb-file-is-fifo"),
    row(lambda t: sync_dir(t.run_with_odd_log("dir")), 403,
        "wandb-file-is-dir"),
    row(lambda t: sync_dir(t.plain_file()), 404, "run_dir-is-a-file"),
    row(lambda t: sync_dir(t.root + "/wandb/nothing"), 404,
        "run_dir-missing"),
    row(lambda t: sync_dir(t.symlink_loop()), 404, "symlink-loop"),
    # Transport.
    row(plain_http, CLOSED, "plain-http-on-tls-port"),
    row(not_tls_at_all, CLOSED, "random-bytes-on-tls-port"),
    row(silent_tcp, CLOSED, "silent-before-handshake", slow_timeouts=True),
    row(silent_tls, CLOSED, "silent-after-handshake", slow_timeouts=True),
    row(slow_tls_hello, CLOSED, "tls-hello-one-byte-at-a-time",
        slow_timeouts=True),
    row(slow_tls_headers, CLOSED, "headers-one-byte-at-a-time",
        slow_timeouts=True),
    row(half_body, CLOSED, "body-shorter-than-content-length",
        slow_timeouts=True),
]

TRANSPORT = (plain_http, not_tls_at_all, silent_tcp, silent_tls,
             slow_tls_hello, slow_tls_headers, half_body)


def _short_timeouts(farm, monkeypatch):
    farm.server.handshake_timeout = 1
    monkeypatch.setattr(FarmHandler, "timeout", 1)


@pytest.mark.parametrize("request_for, expect, slow_timeouts", HOSTILE)
def test_hostile_request_is_refused_and_farm_keeps_serving(
        request_for, expect, slow_timeouts, start_farm, stand_in, tmp_path,
        certificate, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="wandb_offline_sync")
    tree = Tree(tmp_path)
    farm, client = start_farm(stand_in.command, environ=stand_in.environ,
                              allow_roots=[tree.root])
    if slow_timeouts:
        _short_timeouts(farm, monkeypatch)

    if request_for in TRANSPORT:
        answer = request_for(farm.port, certificate[0])
    else:
        answer = exchange(farm.port, certificate[0], request_for(tree))

    if expect == CLOSED:
        assert answer == CLOSED
    else:
        assert answer not in (CLOSED, STILL_OPEN), answer
        status, headers, payload = answer
        assert status == expect, payload
        assert headers["Content-Type"] == "application/json"
        assert isinstance(payload["error"], str) and payload["error"]
    assert client.request("GET", protocol.STATUS_PATH)[0] == 200
    assert farm.scheduler.status() == []
    assert stand_in.calls() == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_table_is_large():
    assert len(HOSTILE) >= 40


def test_slow_clients_do_not_keep_a_good_client_waiting(
        start_farm, stand_in, tmp_path, certificate):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "fast1")
    idle = []
    try:
        for _ in range(5):      # connected, never starts TLS
            idle.append(socket.create_connection(
                ("127.0.0.1", farm.port), 5))
        for _ in range(5):      # finished TLS, never sends a request
            idle.append(tls_connect(farm.port, certificate[0], 5))
        trickling = tls_connect(farm.port, certificate[0], 5)
        idle.append(trickling)
        trickling.sendall(b"GET /status HTTP/1.1\r\nX-Slow: ")

        started = time.monotonic()
        status, _, state = client.sync(run_dir)
        answered_in = time.monotonic() - started

        assert status == 202
        assert client.request("GET", protocol.STATUS_PATH)[0] == 200
        # Generous: a slow client that blocked the farm would hold it for
        # the handler's 20 s timeout; a free farm answers in milliseconds.
        assert answered_in < 5
        for sock in idle:
            assert wait_closed(sock, 0) == STILL_OPEN
    finally:
        for sock in idle:
            sock.close()


def _pool_threads(farm):
    name = "farm-connection-%d" % farm.port
    return [t for t in threading.enumerate() if t.name == name]


def _open_connections(farm, certificate, count):
    """Serve ``count`` connections at once, then close them; return how
    many connection threads the farm had while they were open."""
    sockets = [tls_connect(farm.port, certificate[0], 5)
               for _ in range(count)]
    try:
        for sock in sockets:
            sock.sendall(raw("GET", protocol.STATUS_PATH))
        for sock in sockets:
            assert read_answer(sock, "GET")[0] == 200
        return len(_pool_threads(farm))
    finally:
        for sock in sockets:
            sock.close()


def test_idle_connection_threads_end(start_farm, stand_in, certificate):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    farm.server.idle_thread_timeout = 0.2

    assert _open_connections(farm, certificate, 5) == 5
    assert wait_until(lambda: not _pool_threads(farm), 10)
    assert client.request("GET", protocol.STATUS_PATH)[0] == 200


def test_closing_the_farm_ends_its_connection_threads(
        start_farm, stand_in, certificate):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    assert _open_connections(farm, certificate, 5) == 5

    farm.close()

    assert wait_until(lambda: not _pool_threads(farm), 10)


def test_failed_logins_are_throttled_and_never_logged(
        start_farm, stand_in, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="wandb_offline_sync")
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "thr1")
    wrong = "not-the-password-%d"

    for attempt in range(10):
        status, _, payload = client.request(
            "POST", protocol.SYNC_PATH, {"run_dir": run_dir},
            auth=(USERNAME, wrong % attempt))
        assert status == 401
        assert payload["error"]
    status, headers, payload = client.request(
        "POST", protocol.SYNC_PATH, {"run_dir": run_dir})

    assert status == 429
    assert int(headers["Retry-After"]) > 0
    assert payload["error"]
    assert client.request("GET", protocol.STATUS_PATH)[0] == 429
    assert farm.scheduler.status() == []
    assert stand_in.calls() == []
    secrets = [PASSWORD, GOOD_AUTH.split()[1], "Authorization",
               "not-the-password"]
    secrets += [_basic(USERNAME, wrong % i).split()[1] for i in range(10)]
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        for secret in secrets:
            assert secret not in text


_HOSTILE_TEXT = "evil\nFAKE LOG LINE\r\x1b[31mred\x1b[0m\x07"


def _no_raw_control_characters(records):
    for record in records:
        text = record.getMessage()
        assert "\n" not in text and "\r" not in text, text
        assert "\x1b" not in text and "\x07" not in text, text


def test_client_text_in_refused_requests_is_escaped_in_logs(
        start_farm, stand_in, tmp_path, certificate, caplog):
    caplog.set_level(logging.DEBUG, logger="wandb_offline_sync")
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    missing = str(tmp_path / _HOSTILE_TEXT)
    requests = [
        sync_dir(missing),
        sync_dir("/etc/" + _HOSTILE_TEXT),
        sync_json({"run_dir": missing, "run_id": _HOSTILE_TEXT}),
        sync_bytes(b"run_dir=x", "text/" + _HOSTILE_TEXT.replace(
            "\n", "").replace("\r", "")),
        raw("GET", "/status\x1b[2J\x07"),
    ]

    for data in requests:
        answer = exchange(farm.port, certificate[0], data)
        assert answer not in (CLOSED, STILL_OPEN)
        assert 400 <= answer[0] < 500

    assert any("evil" in r.getMessage() or "\\x1b" in r.getMessage()
               for r in caplog.records)
    _no_raw_control_characters(caplog.records)


def test_unwanted_body_is_not_taken_for_the_next_request(
        start_farm, stand_in, tmp_path, certificate):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    hidden = sync_dir(make_run_dir(tmp_path, "hidden1"))
    data = raw("GET", protocol.STATUS_PATH, hidden)

    with tls_connect(farm.port, certificate[0], 5) as sock:
        sock.sendall(data)
        first = read_answer(sock, "GET")
        sock.settimeout(1)
        second = read_answer(sock, "GET")

    assert first[0] == 200
    assert second == STILL_OPEN        # no answer to the hidden request
    assert farm.scheduler.status() == []
    assert stand_in.calls() == []


def test_clients_that_vanish_mid_request_are_not_logged_as_errors(
        start_farm, stand_in, certificate, caplog):
    caplog.set_level(logging.DEBUG, logger="wandb_offline_sync")
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    # SO_LINGER with a zero timeout: close() resets the connection.
    reset = struct.pack("ii", 1, 0)

    for _ in range(20):
        sock = tls_connect(farm.port, certificate[0], 5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
        sock.sendall(raw("GET", protocol.STATUS_PATH))
        sock.close()

    assert client.request("GET", protocol.STATUS_PATH)[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_client_text_in_an_accepted_run_dir_is_escaped_in_logs(
        start_farm, stand_in, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="wandb_offline_sync")
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path / _HOSTILE_TEXT, "esc1")

    status, _, state = client.sync(run_dir)

    assert status == 202
    assert state["run_dir"] == run_dir
    _no_raw_control_characters(caplog.records)
