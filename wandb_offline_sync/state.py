"""The farm's memory across restarts: one JSON file, replaced atomically.

The scheduler hands :class:`StateStore` a list of plain dicts (one per run)
and gets them back after a restart.  A write goes to a temporary file in
the same directory, is flushed to disk, and replaces the old file with
``os.replace``, so a crash or kill -9 leaves either the old state or the
new one, never half of each.  JSON rather than sqlite3 because the state
directory is often in a home directory on NFS, where sqlite's locking is
unreliable and a rename is atomic.
"""

import json
import logging
import os
import tempfile
import time

__all__ = ["StateStore"]

log = logging.getLogger(__name__)

_FORMAT = 1


class StateStore:
    """Loads and saves the runs a farm knows, in ``<state_dir>/runs.json``.
    """

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "runs.json")

    def load(self):
        """The runs saved last, or [] when there is no usable file.

        A file that cannot be read as state is moved aside (and logged), so
        it can be looked at and the farm still starts.
        """
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
            if data.get("format") != _FORMAT or \
                    not isinstance(data.get("runs"), list):
                raise ValueError("unknown format")
            return [r for r in data["runs"] if isinstance(r, dict)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, AttributeError) as exc:
            aside = "%s.unreadable-%d" % (self.path, int(time.time()))
            log.error("state file unreadable, moved to %s: %s", aside, exc)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            return []

    def save(self, runs):
        """Replace the saved runs with ``runs`` (a list of JSON dicts)."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        body = json.dumps({"format": _FORMAT, "saved": time.time(),
                           "runs": runs}).encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=".runs-", dir=self.state_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(self.state_dir)


def _fsync_dir(path):
    # Makes the rename itself durable; not every filesystem allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
