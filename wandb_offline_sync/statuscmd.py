"""``wandb_sync_farm status``: what a farm is doing, in the terminal.

Reads the farm's ``GET /status`` with the agent's settings (the
``WANDB_SYNC_FARM_*`` variables, overridden by options) and prints one
line per run, or the JSON itself with ``--json``.  Like the agent, it
trusts only the certificate in ``WANDB_SYNC_FARM_CERT`` when that is set,
never goes through a proxy, and otherwise connects without checking the
farm's certificate, saying so on stderr.

Anything that stops it from reading the status (farm down, wrong
password, a certificate that does not match) is one line on stderr and
exit code ``EXIT_FAILED``.  The wording of ages and errors comes from
:mod:`.page`, so the terminal and the browser say the same thing.
"""

import argparse
import base64
import http.client
import json
import os
import shutil
import socket
import ssl
import sys
import time
import traceback
import urllib.error
import urllib.request

from . import __version__, protocol
from .errors import WandbSyncError
from .farm import EXIT_FAILED, EXIT_OK
from .page import describe_duration, describe_last_sync, last_error

__all__ = ["main", "build_parser", "fetch_status", "format_table",
           "StatusError"]

#: Seconds the farm has to answer.
DEFAULT_TIMEOUT = 10.0

# Columns of the table: heading, and the widest a value may make it.  The
# last column takes what is left of the terminal.
_COLUMNS = (("RUN", 40), ("STATE", 12), ("LAST SYNC AGO", 20),
            ("ATTEMPTS", 8), ("FINAL", 5))
_LAST_COLUMN = "LAST ERROR"
_GAP = "  "
# The last column keeps at least this many characters on a narrow
# terminal; the line is then wider than the terminal.
_MIN_LAST_WIDTH = 20


class StatusError(WandbSyncError):
    """The farm's status could not be read; the message says why."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="wandb_sync_farm status",
        description="Show the runs a wandb_sync_farm knows and how their "
                    "syncs went.  Defaults come from the same "
                    "environment variables the agent reads.")
    parser.add_argument(
        "--host", help="the farm's host (default: $%s or %s)"
                       % (protocol.ENV_HOST, protocol.DEFAULT_HOST))
    parser.add_argument(
        "--port", type=int, help="the farm's port (default: $%s or %d)"
                                 % (protocol.ENV_PORT,
                                    protocol.DEFAULT_PORT))
    parser.add_argument(
        "--username", help="default: $%s" % protocol.ENV_USERNAME)
    parser.add_argument(
        "--password", help="default: $%s, which is better: a password "
                           "given here is visible to other users in ps"
                           % protocol.ENV_PASSWORD)
    parser.add_argument(
        "--cert", help="the farm's certificate; only it is trusted "
                       "(default: $%s)" % protocol.ENV_CERT)
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT,
        help="seconds the farm has to answer (default: %(default)s)")
    parser.add_argument(
        "--json", action="store_true",
        help="print the farm's status as JSON instead of a table")
    parser.add_argument(
        "--verbose", action="store_true",
        help="show a traceback when the status cannot be read")
    return parser


def main(argv=None):
    args = build_parser().parse_args(
        sys.argv[1:] if argv is None else list(argv))
    try:
        address = protocol.FarmAddress(
            host=args.host, port=args.port, username=args.username,
            password=args.password, cert=args.cert)
    except ValueError:
        print("wandb_sync_farm status: error: %s is not a port number"
              % protocol.ENV_PORT, file=sys.stderr)
        return EXIT_FAILED
    if not address.cert:
        print("wandb_sync_farm status: note: %s is not set, so the farm's "
              "certificate is not checked" % protocol.ENV_CERT,
              file=sys.stderr)

    try:
        status = fetch_status(address, timeout=args.timeout)
    except StatusError as exc:
        if args.verbose:
            traceback.print_exc()
        print("wandb_sync_farm status: error: %s" % exc, file=sys.stderr)
        return EXIT_FAILED

    try:
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            width = shutil.get_terminal_size().columns
            print(format_table(status, width=width,
                               where=address.url("")))
        sys.stdout.flush()
    except BrokenPipeError:
        # `| head` closed the pipe: fine, and nothing more to print.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def fetch_status(address, timeout=DEFAULT_TIMEOUT):
    """The farm's status dict; StatusError with a readable reason if not.

    ``address`` is a :class:`~wandb_offline_sync.protocol.FarmAddress`.
    """
    url = address.url(protocol.STATUS_PATH)
    opener = urllib.request.build_opener(
        # The farm is on the cluster's own network: never via a proxy.
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=_client_context(address.cert)))
    token = "%s:%s" % (address.username, address.password)
    request = urllib.request.Request(url, headers={
        "Authorization": "Basic " + base64.b64encode(
            token.encode("utf-8")).decode("ascii"),
        "User-Agent": "wandb_sync_farm-status/" + __version__})

    try:
        with opener.open(request, timeout=timeout) as answer:
            body = answer.read()
    except urllib.error.HTTPError as exc:
        raise StatusError(_refusal(exc, url)) from None
    except urllib.error.URLError as exc:
        raise StatusError(_unreachable(exc.reason, url, address.cert)) \
            from None
    except (OSError, http.client.HTTPException) as exc:
        raise StatusError(_unreachable(exc, url, address.cert)) from None

    try:
        status = json.loads(body.decode("utf-8"))
    except ValueError:
        status = None
    if not isinstance(status, dict) or \
            not isinstance(status.get("runs"), list):
        raise StatusError("%s did not answer with a farm's status; is "
                          "this a wandb_sync_farm?" % url)
    return status


def format_table(status, width=80, now=None, where=None):
    """The status as a header line and a fixed-width table of runs.

    The last column (the last error) is cut to fit ``width`` characters.
    """
    if now is None:
        now = time.time()
    farm = status.get("farm") or {}
    runs = [run for run in status.get("runs") or []
            if isinstance(run, dict)]

    header = "farm %s (%s)" % (farm.get("version") or "?",
                               farm.get("wandb") or "wandb version unknown")
    if farm.get("mode"):
        header += ", %s mode" % farm["mode"]
    if where:
        header += " at %s" % where
    started = farm.get("started")
    if isinstance(started, (int, float)):
        header += ", up %s" % describe_duration(now - started)
    header += ", %d run%s" % (len(runs), "" if len(runs) == 1 else "s")
    if not runs:
        return _printable(header)

    rows = [_cells(run, now) for run in runs]
    widths = [min(limit, max([len(heading)]
                             + [len(row[i]) for row in rows]))
              for i, (heading, limit) in enumerate(_COLUMNS)]
    used = sum(widths) + len(_GAP) * len(widths)
    last_width = max(_MIN_LAST_WIDTH, width - used - 1)
    lines = [_printable(header), ""]
    for row in [[heading for heading, _ in _COLUMNS] + [_LAST_COLUMN]] \
            + rows:
        fields = [_fit(text, w).ljust(w) for text, w in zip(row, widths)]
        fields.append(_fit(row[-1], last_width))
        lines.append(_GAP.join(fields).rstrip())
    return "\n".join(lines)


def _cells(run, now):
    """The table's cells for one run, as printable text."""
    cells = [str(run.get("run_id") or run.get("run_dir") or "?"),
             str(run.get("state") or "unknown"),
             describe_last_sync(run, now, suffix=""),
             str(run.get("attempts", "")),
             "yes" if run.get("final_requested") else "no",
             last_error(run)]
    return [_printable(cell) for cell in cells]


def _fit(text, width):
    if len(text) <= width:
        return text
    return text[:max(0, width - 3)] + "..."


def _printable(text):
    # Error texts hold what wandb printed about a client's run: keep
    # terminal control sequences in them from reaching the terminal.
    return "".join(c if c.isprintable() else "?" for c in text)


def _client_context(cert):
    """A TLS context trusting only ``cert``, or trusting anything."""
    if cert:
        try:
            context = ssl.create_default_context(cafile=cert)
        except (OSError, ssl.SSLError) as exc:
            raise StatusError("cannot use the certificate %s: %s"
                              % (cert, getattr(exc, "strerror", None)
                                 or exc)) from None
        # Pinned: the certificate is the only trust anchor, so its names
        # need not match the host the farm is reached by (as the agent).
        context.check_hostname = False
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _refusal(error, url):
    try:
        reason = json.loads(error.read(65536).decode("utf-8"))["error"]
    except Exception:
        reason = error.reason
    if error.code == 401:
        return ("the farm at %s refused the username or password (401); "
                "check %s and %s" % (url, protocol.ENV_USERNAME,
                                     protocol.ENV_PASSWORD))
    if error.code == 429:
        return ("the farm at %s refuses this address for a while after "
                "failed logins (429); try again in a minute" % url)
    return "the farm at %s answered %d: %s" % (url, error.code,
                                                _printable(str(reason)))


def _unreachable(reason, url, cert):
    if isinstance(reason, ssl.SSLCertVerificationError):
        return ("the farm at %s did not show the certificate in %s (%s); "
                "is %s the farm's cert.pem?"
                % (url, cert, reason.verify_message, cert))
    if isinstance(reason, ssl.SSLError):
        return "TLS with the farm at %s failed: %s" % (url, reason)
    if isinstance(reason, socket.timeout):
        return "the farm at %s did not answer in time" % url
    if isinstance(reason, OSError) and reason.strerror:
        return "cannot reach the farm at %s: %s" % (url, reason.strerror)
    return "cannot reach the farm at %s: %s" % (url, reason)


if __name__ == "__main__":
    sys.exit(main())
