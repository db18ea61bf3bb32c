"""The farm's HTTPS front: TLS, basic auth, and the routes agents call.

:class:`FarmServer` is an ``HTTPServer`` that accepts plain TCP connections
in its loop and hands each to a pool of threads, one connection per thread,
which do the TLS handshake there, so a client that never finishes a
handshake (or speaks plain HTTP to the TLS port) delays nobody else.  The
pool keeps idle threads for the next connections: starting a thread per
connection made the accepting loop wait for each new thread to run, which
capped the farm at a few hundred connections a second.  A request must
arrive whole within the handler's timeout, so a client that trickles its
headers a byte at a time is dropped too.  :class:`FarmHandler` checks HTTP
basic auth, parses sync requests (see protocol), checks the run directory
(see rundirs) and hands the run to the scheduler.  Every error is answered
with a JSON body ``{"error": reason}`` and the server keeps serving.

Routes: ``POST /sync``, ``GET /status``, ``GET /`` (an HTML page).
"""

import base64
import binascii
import hmac
import io
import json
import logging
import queue
import re
import socket
import ssl
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer

from . import __version__, protocol
from .errors import RequestError

__all__ = ["FarmServer", "FarmHandler", "make_server_context",
           "LoginThrottle", "escape"]

log = logging.getLogger(__name__)

_AUTH_REALM = 'Basic realm="wandb_sync_farm", charset="UTF-8"'


def escape(text, limit=200):
    """Make client-supplied text safe to put in a log line."""
    if not isinstance(text, str):
        text = str(text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("unicode_escape").decode("ascii")


def make_server_context(cert, key):
    """A TLS 1.2+ server context; ssl/OS errors pass to the caller."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class LoginThrottle:
    """Counts failed logins per address and says when to stop listening.

    After ``max_failures`` failures from one address within ``window``
    seconds, that address is refused for ``cooldown`` seconds without
    its passwords being checked.
    """

    max_failures = 10
    window = 60.0
    cooldown = 60.0
    #: Addresses remembered at most, so a flood of them stays bounded.
    max_addresses = 4096

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        # Guards _failures and _blocked.
        self._lock = threading.Lock()
        self._failures = {}     # address -> list of failure times
        self._blocked = {}      # address -> monotonic time it ends

    def blocked_for(self, address):
        """Seconds ``address`` must still wait, or 0."""
        with self._lock:
            until = self._blocked.get(address)
            if until is None:
                return 0.0
            left = until - self._clock()
            if left <= 0:
                del self._blocked[address]
                return 0.0
            return left

    def failed(self, address):
        """Record a failure; True when the address is now blocked."""
        now = self._clock()
        with self._lock:
            if len(self._failures) >= self.max_addresses:
                self._failures.clear()
            times = [t for t in self._failures.get(address, ())
                     if now - t < self.window]
            times.append(now)
            if len(times) >= self.max_failures:
                self._failures.pop(address, None)
                self._blocked[address] = now + self.cooldown
                return True
            self._failures[address] = times
            return False

    def succeeded(self, address):
        with self._lock:
            self._failures.pop(address, None)


class FarmServer(HTTPServer):
    """HTTPS server that hands sync requests to a scheduler."""

    #: Connections the kernel holds until they are accepted: the agents
    #: of a job array may all start, and connect, at once.
    request_queue_size = 1024
    #: Seconds a client has to finish the TLS handshake.
    handshake_timeout = 10.0
    #: Connections served at once; more are closed at once.
    max_connections = 512
    #: Seconds an idle pool thread waits for a connection before it ends.
    idle_thread_timeout = 60.0

    def __init__(self, address, *, ssl_context, username, password,
                 scheduler, policy, farm_info=None, page=None,
                 throttle=None):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(self.max_connections)
        # Accepted connections waiting for a pool thread; None ends one.
        self._connections = queue.SimpleQueue()
        # Guards _pool_size and _idle_threads.  Idle threads are those
        # waiting on _connections that no queued connection is meant for.
        self._pool_lock = threading.Lock()
        self._pool_size = 0
        self._idle_threads = 0
        # Binds and listens; on failure it calls server_close(), which
        # needs the pool above.
        super().__init__(address, FarmHandler)
        self.ssl_context = ssl_context
        self._credentials = (username.encode("utf-8"),
                             password.encode("utf-8"))
        self.scheduler = scheduler
        self.policy = policy
        self.farm_info = dict(farm_info or {})
        self.page = page                 # callable(status dict) -> str
        self.throttle = throttle or LoginThrottle()

    def check_credentials(self, username, password):
        """Compare in constant time; both parts are always compared."""
        user_ok = hmac.compare_digest(username, self._credentials[0])
        pass_ok = hmac.compare_digest(password, self._credentials[1])
        return user_ok and pass_ok

    def status(self):
        return {"farm": self.farm_info, "runs": self.scheduler.status()}

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            log.warning("too many connections; closing one from %s",
                        client_address[0])
            self.shutdown_request(request)
            return
        self._connections.put((request, client_address))
        with self._pool_lock:
            if self._idle_threads:
                self._idle_threads -= 1
                return
            self._pool_size += 1
        threading.Thread(target=self._serve_connections, daemon=True,
                         name="farm-connection-%d"
                         % self.server_address[1]).start()

    def _serve_connections(self):
        """A pool thread: serve queued connections until idle too long."""
        while True:
            try:
                item = self._connections.get(
                    timeout=self.idle_thread_timeout)
            except queue.Empty:
                with self._pool_lock:
                    if not self._idle_threads:
                        continue    # a connection is queued for us
                    self._idle_threads -= 1
                    self._pool_size -= 1
                return
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                self._slots.release()
            with self._pool_lock:
                self._idle_threads += 1

    def server_close(self):
        super().server_close()
        with self._pool_lock:
            threads = self._pool_size
        # Idle threads end now; busy ones when their connection ends.
        for _ in range(threads):
            self._connections.put(None)

    def finish_request(self, request, client_address):
        request.settimeout(self.handshake_timeout)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake failed: client=%s error=%s",
                      client_address[0], escape(exc))
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, ssl.SSLError,
                              socket.timeout)):
            # The client went away mid-answer: its loss, not the farm's.
            log.debug("connection lost: client=%s error=%s",
                      client_address[0], escape(error))
            return
        log.exception("error while serving %s", client_address[0])


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side that gives up at a deadline.

    A socket timeout bounds each read alone, so a client sending a byte
    every few seconds could hold a connection for ever.  Each read here
    also stops at ``deadline`` (monotonic seconds), which the handler
    sets when it starts waiting for a request.
    """

    def __init__(self, sock, timeout):
        super().__init__()
        self._sock = sock
        self._timeout = timeout
        self.deadline = None

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self._timeout
        if self.deadline is not None:
            left = min(left, self.deadline - time.monotonic())
            if left <= 0:
                raise socket.timeout("the request took too long")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            # Writes keep the plain per-operation timeout.
            self._sock.settimeout(self._timeout)


class FarmHandler(BaseHTTPRequestHandler):
    """One connection from an agent or a person."""

    server_version = "wandb_sync_farm/" + __version__
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # An answer is buffered and sent in one write, with TCP_NODELAY (see
    # setup): headers and body in two small writes met the client's
    # delayed ACK and Nagle's algorithm and could wait 40 ms.
    wbufsize = -1
    # Errors found before the request line's version is read are answered
    # with a status line; http.server's HTTP/0.9 default would send the
    # bare JSON body, which no client can read as an answer.
    default_request_version = "HTTP/1.0"
    #: Seconds a connection may sit idle, and seconds a whole request
    #: (line, headers and body) may take to arrive, before it is closed.
    timeout = 20.0
    #: Largest unwanted body read and dropped so an error answer arrives.
    drain_limit = 1024 * 1024
    _body_read = True
    _requested_dir = None

    # -- plumbing ------------------------------------------------------

    def setup(self):
        # StreamRequestHandler.setup, with a reading side that keeps the
        # request's deadline.
        self.connection = self.request
        self.connection.settimeout(self.timeout)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                   True)
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = self.connection.makefile("wb", self.wbufsize)

    def handle_one_request(self):
        self._reader.deadline = time.monotonic() + self.timeout
        super().handle_one_request()

    def log_message(self, format, *args):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.client_address[0],
                      escape(format % args, limit=400))

    def date_time_string(self, timestamp=None):
        if timestamp is not None:
            return super().date_time_string(timestamp)
        # Formatting the Date header is a visible part of a small answer's
        # cost; it changes once a second.
        global _date_header
        now = int(time.time())
        second, text = _date_header
        if second != now:
            text = super().date_time_string(now)
            _date_header = (now, text)
        return text

    def send_error(self, code, message=None, explain=None):
        """Every error, ours or http.server's, gets a JSON body."""
        reason = message or HTTPStatus(code).phrase
        self.close_connection = True
        self._send_json(code, {"error": reason},
                        headers={"Connection": "close"})

    def _send_json(self, code, payload, headers=None, indent=None):
        # Without indent, json uses its C encoder; /status is indented for
        # the people who read it with curl.
        body = json.dumps(payload, indent=indent).encode("utf-8") + b"\n"
        self._send_body(code, body, "application/json", headers)

    def _send_body(self, code, body, content_type, headers=None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _authorized(self):
        """Check basic auth; on failure answer and return False."""
        address = self.client_address[0]
        wait = self.server.throttle.blocked_for(address)
        if wait:
            self.close_connection = True
            self._drain_body()
            self._send_json(429, {"error": "too many failed logins; try "
                                  "again later"},
                            headers={"Retry-After": str(int(wait) + 1),
                                     "Connection": "close"})
            return False
        username, password = _basic_credentials(
            self.headers.get("Authorization"))
        if username is not None and \
                self.server.check_credentials(username, password):
            self.server.throttle.succeeded(address)
            return True
        if self.server.throttle.failed(address):
            log.warning("login failures; cooling down: client=%s",
                        address)
        else:
            log.warning("login failed: client=%s", address)
        self.close_connection = True
        self._drain_body()
        self._send_json(401, {"error": "authentication required"},
                        headers={"WWW-Authenticate": _AUTH_REALM,
                                 "Connection": "close"})
        return False

    def _drain_body(self):
        """Read an unread body before an answer.

        An unread body would be taken for the next request on this
        connection, and closing a socket with unread data makes TCP reset
        it, so the client may lose the answer.  Bodies up to DRAIN_LIMIT
        are read and dropped (within the handler's timeout); after any
        other the connection is closed.
        """
        if self._body_read:
            return
        self._body_read = True
        try:
            size = self._content_length() or 0
        except _HTTPError:
            size = None
        if size is None or size > self.drain_limit or \
                "Transfer-Encoding" in self.headers:
            self.close_connection = True
            return
        while size > 0:
            try:
                chunk = self.rfile.read(min(size, 65536))
            except OSError:
                chunk = b""
            if not chunk:
                self.close_connection = True
                return
            size -= len(chunk)

    def _content_length(self):
        """The declared body size, or None; _HTTPError if it is unclear.

        Only ASCII digits count (``int()`` would also take ``+1``, ``1_0``
        and other scripts' digits), and repeated headers must agree: a
        proxy that read the other value would see a different next
        request (RFC 9112, section 6.3).
        """
        values = self.headers.get_all("Content-Length")
        if not values:
            return None
        texts = {value.strip() for value in values}
        if len(texts) > 1:
            raise _HTTPError(400, "Content-Length is given more than once "
                             "with different values")
        text = texts.pop()
        if not _DECIMAL.match(text):
            raise _HTTPError(400, "Content-Length must be a number of "
                             "bytes")
        return int(text)

    def _read_body(self):
        self._body_read = True
        if "Transfer-Encoding" in self.headers:
            raise _HTTPError(411, "send the body with a Content-Length")
        size = self._content_length()
        if size is None:
            raise _HTTPError(411, "Content-Length is required")
        if size > protocol.MAX_BODY_BYTES:
            self._body_read = False     # drained before the answer
            raise _HTTPError(413, "body is larger than %d bytes"
                             % protocol.MAX_BODY_BYTES)
        body = self.rfile.read(size)
        if len(body) != size:
            raise _HTTPError(400, "body ended before Content-Length")
        return body

    # -- methods -------------------------------------------------------

    def do_POST(self):
        self._dispatch({protocol.SYNC_PATH: self._post_sync})

    def do_GET(self):
        self._dispatch({protocol.STATUS_PATH: self._get_status,
                        "/": self._get_page})

    def do_HEAD(self):
        self.do_GET()

    def _method_not_allowed(self):
        self._dispatch({})

    def __getattr__(self, name):
        # http.server looks up do_<METHOD>; any method without one of its
        # own (PUT, DELETE, made-up ones) gets 405 rather than 501.
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _dispatch(self, routes):
        self._body_read = False
        self._requested_dir = None
        try:
            path = self.path.split("?", 1)[0]
            known = path in (protocol.SYNC_PATH, protocol.STATUS_PATH, "/")
            if not self._authorized():
                return
            if not known:
                raise _HTTPError(404, "no such path; use POST %s or GET %s"
                                 % (protocol.SYNC_PATH,
                                    protocol.STATUS_PATH))
            route = routes.get(path)
            if route is None:
                raise _HTTPError(405, "method %s is not allowed here"
                                 % self.command, allow=True)
            route()
            self._drain_body()
        except _HTTPError as exc:
            self._drain_body()
            headers = {}
            if exc.allow:
                headers["Allow"] = _ALLOWED[path]
            if exc.retry_after:
                headers["Retry-After"] = str(exc.retry_after)
            self.close_connection = True
            headers["Connection"] = "close"
            self._send_json(exc.status, {"error": exc.reason}, headers)
        except RequestError as exc:
            log.info("request refused: client=%s status=%d reason=%s "
                     "dir=%s", self.client_address[0], exc.status,
                     escape(exc), escape(self._requested_dir or "-"))
            headers = {}
            if exc.status == 503:
                headers["Retry-After"] = "60"
            self._send_json(exc.status, {"error": str(exc)}, headers)

    def _post_sync(self):
        body = self._read_body()
        request = protocol.parse_sync_request(
            body, self.headers.get("Content-Type"))
        self._requested_dir = request.run_dir
        location = self.server.policy.locate(request.run_dir)
        run_id = request.run_id or \
            protocol.run_id_from_file(
                location.wandb_file.rsplit("/", 1)[-1])
        log.debug("sync request: run=%s final=%s dir=%s", run_id,
                  request.final, escape(location.run_dir))
        state = self.server.scheduler.request(
            location.run_dir, run_id, final=request.final,
            wandb_file=location.wandb_file)
        self._send_json(202, state)

    def _get_status(self):
        self._send_json(200, self.server.status(), indent=1)

    def _get_page(self):
        if self.server.page is None:
            raise _HTTPError(404, "no status page; use GET %s"
                             % protocol.STATUS_PATH)
        html = self.server.page(self.server.status())
        self._send_body(200, html.encode("utf-8"),
                        "text/html; charset=utf-8")


# (second, its Date header), shared by the handlers.
_date_header = (None, None)

_DECIMAL = re.compile(r"[0-9]{1,15}\Z")

_ALLOWED = {protocol.SYNC_PATH: "POST",
            protocol.STATUS_PATH: "GET, HEAD",
            "/": "GET, HEAD"}


class _HTTPError(Exception):
    def __init__(self, status, reason, allow=False, retry_after=None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.allow = allow
        self.retry_after = retry_after


def _basic_credentials(header):
    """``(username, password)`` bytes from a Basic header, or (None, None)."""
    if not header or len(header) > 1024:
        return None, None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None, None
    username, sep, password = decoded.partition(b":")
    if not sep:
        return None, None
    return username, password

