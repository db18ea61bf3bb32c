"""What the agent and the farm agree on: names, defaults and the wire format.

Both sides import this module, so an environment variable, a default or a
field of a sync request is defined here once.  The module knows nothing of
HTTP or TLS; it only turns request bodies into :class:`SyncRequest` objects
and back, and raises :class:`~wandb_offline_sync.errors.BadRequest` with a
reason a person can read when a body makes no sense.
"""

import json
import os
import re
from urllib.parse import parse_qs

from .errors import BadRequest

__all__ = [
    "ENV_HOST", "ENV_PORT", "ENV_USERNAME", "ENV_PASSWORD", "ENV_CERT",
    "DEFAULT_HOST", "DEFAULT_BIND", "DEFAULT_PORT", "DEFAULT_USERNAME",
    "DEFAULT_PASSWORD", "MAX_BODY_BYTES", "SYNC_PATH", "STATUS_PATH",
    "SyncRequest", "parse_sync_request", "encode_sync_request",
    "run_id_from_dir", "FarmAddress",
]

# Environment variables read by both sides (names kept from 0.0.14).
ENV_HOST = "WANDB_SYNC_FARM_HOST"
ENV_PORT = "WANDB_SYNC_FARM_PORT"
ENV_USERNAME = "WANDB_SYNC_FARM_USERNAME"
ENV_PASSWORD = "WANDB_SYNC_FARM_PASSWORD"
# Path of the farm's cert.pem on the agent's side; pins the farm.
ENV_CERT = "WANDB_SYNC_FARM_CERT"

DEFAULT_HOST = "localhost"      # where the agent looks for the farm
DEFAULT_BIND = "0.0.0.0"        # where the farm listens
DEFAULT_PORT = 57891
DEFAULT_USERNAME = "user"
DEFAULT_PASSWORD = "pass"

SYNC_PATH = "/sync"
STATUS_PATH = "/status"

# A sync request is a few hundred bytes; anything much larger is not one.
MAX_BODY_BYTES = 16 * 1024
# Longest path the farm accepts (Linux PATH_MAX).
MAX_PATH_CHARS = 4096

# \Z, not $: $ also matches before a final newline.
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
_RUN_DIR_NAME_RE = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(.+)$")
_RUN_FILE_RE = re.compile(r"^run-(.+)\.wandb$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class FarmAddress:
    """Where the farm is and how to log in, read from the environment.

    Keyword arguments override the environment; the environment overrides
    the defaults above.
    """

    def __init__(self, *, host=None, port=None, username=None,
                 password=None, cert=None, environ=None):
        env = os.environ if environ is None else environ
        self.host = host or env.get(ENV_HOST) or DEFAULT_HOST
        self.port = int(port or env.get(ENV_PORT) or DEFAULT_PORT)
        self.username = username or env.get(ENV_USERNAME) or DEFAULT_USERNAME
        self.password = password or env.get(ENV_PASSWORD) or DEFAULT_PASSWORD
        self.cert = cert or env.get(ENV_CERT) or None

    def url(self, path):
        host = self.host
        if ":" in host and not host.startswith("["):
            host = "[%s]" % host       # a bare IPv6 address
        return "https://%s:%d%s" % (host, self.port, path)

    def __repr__(self):
        # The password stays out of reprs, logs and tracebacks.
        return "FarmAddress(host=%r, port=%d, username=%r, cert=%r)" % (
            self.host, self.port, self.username, self.cert)


class SyncRequest:
    """One request from an agent: sync this run directory.

    ``final`` says the run has ended and this is the last sync it needs.
    """

    __slots__ = ("run_dir", "run_id", "final")

    def __init__(self, run_dir, run_id=None, final=False):
        self.run_dir = run_dir
        self.run_id = run_id
        self.final = final

    def to_dict(self):
        return {"run_dir": self.run_dir, "run_id": self.run_id,
                "final": self.final}

    def __eq__(self, other):
        return (isinstance(other, SyncRequest)
                and self.to_dict() == other.to_dict())

    def __repr__(self):
        return "SyncRequest(%r, run_id=%r, final=%r)" % (
            self.run_dir, self.run_id, self.final)


def encode_sync_request(request):
    """Body and content type the agent sends for ``request``."""
    body = json.dumps(request.to_dict()).encode("utf-8")
    return body, "application/json"


def parse_sync_request(body, content_type):
    """Turn a request body into a :class:`SyncRequest`.

    JSON is the current format.  The form encoding of 0.0.14 agents
    (``run_id=...&run_dir=...``) is accepted too.  A body without a
    content type is tried as JSON, then as a form.  Raises BadRequest.
    """
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == "application/json":
        fields = _parse_json(body)
    elif media_type == "application/x-www-form-urlencoded":
        fields = _parse_form(body)
    elif media_type == "":
        stripped = body.lstrip()
        if stripped.startswith(b"{"):
            fields = _parse_json(body)
        else:
            fields = _parse_form(body)
    else:
        raise BadRequest("unsupported content type %r; send "
                         "application/json" % media_type[:80])
    return _request_from_fields(fields)


def _parse_json(body):
    try:
        fields = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("body is not valid JSON: %s" % exc) from None
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") \
            from None
    if not isinstance(fields, dict):
        raise BadRequest("body must be a JSON object")
    return fields


def _parse_form(body):
    try:
        text = body.decode("utf-8")
        pairs = parse_qs(text, keep_blank_values=True, strict_parsing=True,
                         max_num_fields=16)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("body is not a valid form: %s" % exc) from None
    fields = {}
    for name, values in pairs.items():
        if len(values) != 1:
            raise BadRequest("field %r given %d times"
                             % (name[:40], len(values)))
        fields[name] = values[0]
    if "final" in fields:
        fields["final"] = _form_bool(fields["final"])
    return fields


def _form_bool(text):
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BadRequest("final must be true or false, not %r" % text[:40])


def _request_from_fields(fields):
    run_dir = fields.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise BadRequest("run_dir is required and must be a non-empty "
                         "string")
    if len(run_dir) > MAX_PATH_CHARS:
        raise BadRequest("run_dir is longer than %d characters"
                         % MAX_PATH_CHARS)
    if "\x00" in run_dir:
        raise BadRequest("run_dir contains a NUL character")
    if not os.path.isabs(run_dir):
        raise BadRequest("run_dir must be an absolute path")

    run_id = fields.get("run_id")
    if run_id is not None:
        if not isinstance(run_id, str) or not _is_run_id(run_id):
            raise BadRequest("run_id must be 1 to 128 letters, digits, "
                             "'-' or '_'")

    final = fields.get("final", False)
    if not isinstance(final, bool):
        raise BadRequest("final must be true or false")
    return SyncRequest(run_dir, run_id or None, final)


def _is_run_id(text):
    return _RUN_ID_RE.match(text) is not None


def run_id_from_dir(run_dir):
    """The run id wandb encodes in a run directory's name, or None.

    Like a run id sent by an agent, it must pass the run id rule; a name
    with other characters gives None.
    """
    name = os.path.basename(os.path.normpath(run_dir))
    match = _RUN_DIR_NAME_RE.match(name)
    if match and _is_run_id(match.group(1)):
        return match.group(1)
    return None


def run_id_from_file(file_name):
    """The run id in a ``run-<id>.wandb`` file name, or None."""
    match = _RUN_FILE_RE.match(file_name)
    if match and _is_run_id(match.group(1)):
        return match.group(1)
    return None
