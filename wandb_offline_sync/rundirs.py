"""Which run directories the farm may sync, and what a request's path means.

The farm uploads with its owner's W&B API key whatever run it is asked to,
so a requested path is checked before anything runs:

1. ``--path-map FROM=TO`` rewrites a prefix, for nodes that mount the shared
   filesystem under different names;
2. symlinks are resolved; a path to the ``.wandb`` file or to the run's
   ``files`` folder means the run directory;
3. the result must lie under an allowed root, be a directory holding
   exactly one ``run-*.wandb`` file, and be owned by the farm's user
   (unless the policy allows the farm user's groups too).

This module only looks at the filesystem; it never runs anything.
"""

import os
import stat

from .errors import BadRequest, Forbidden, RunNotFound

__all__ = ["RunDirPolicy", "parse_path_map", "RunLocation"]


class RunLocation:
    """A checked run directory and the transaction log inside it."""

    __slots__ = ("run_dir", "wandb_file")

    def __init__(self, run_dir, wandb_file):
        self.run_dir = run_dir
        self.wandb_file = wandb_file

    def __repr__(self):
        return "RunLocation(%r)" % self.run_dir


def parse_path_map(text):
    """Split ``FROM=TO`` into a pair of absolute, normalised prefixes."""
    source, sep, target = text.partition("=")
    if not sep or not source or not target:
        raise ValueError("path map must look like FROM=TO, got %r" % text)
    if not (os.path.isabs(source) and os.path.isabs(target)):
        raise ValueError("both sides of a path map must be absolute: %r"
                         % text)
    return os.path.normpath(source), os.path.normpath(target)


class RunDirPolicy:
    """Decides whether a requested path is a run the farm may sync."""

    def __init__(self, *, allow_roots, path_maps=(), allow_group=False,
                 uid=None, gids=None):
        if not allow_roots:
            raise ValueError("at least one allowed root is needed")
        # Roots are resolved once so a request cannot escape through a
        # symlinked root that changes later.
        self.allow_roots = tuple(os.path.realpath(r) for r in allow_roots)
        # Longest prefix first, so /a/b=... wins over /a=...
        self.path_maps = tuple(sorted(path_maps, key=lambda m: -len(m[0])))
        self.allow_group = allow_group
        self.uid = os.getuid() if uid is None else uid
        self.gids = set(os.getgroups() if gids is None else gids)

    def map_path(self, path):
        """Apply the first matching ``--path-map`` to ``path``."""
        normal = os.path.normpath(path)
        if normal.startswith("//"):
            # POSIX normpath keeps exactly two leading slashes (their
            # meaning is left to the system); Linux reads them as one.
            normal = "/" + normal.lstrip("/")
        for source, target in self.path_maps:
            if normal == source:
                return target
            prefix = source.rstrip(os.sep) + os.sep
            if normal.startswith(prefix):
                return os.path.join(target, normal[len(prefix):])
        return normal

    def locate(self, requested):
        """Check ``requested`` and return its :class:`RunLocation`.

        Raises BadRequest, Forbidden or RunNotFound with a reason.
        """
        if not isinstance(requested, str) or not os.path.isabs(requested):
            raise BadRequest("run_dir must be an absolute path")
        if "\x00" in requested:
            raise BadRequest("run_dir contains a NUL character")
        try:
            os.fsencode(requested)
        except UnicodeEncodeError:
            # A lone surrogate from JSON "\ud800": no file has that name,
            # and the os functions below would raise on it.
            raise BadRequest("run_dir is not a valid file name") from None
        path = os.path.realpath(self.map_path(requested))
        if os.path.basename(path).endswith(".wandb") and \
                os.path.isfile(path):
            path = os.path.dirname(path)
        elif os.path.basename(path) == "files":
            path = os.path.dirname(path)

        if not self.is_allowed(path):
            raise Forbidden("run_dir is outside the farm's allowed roots")
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise RunNotFound("run_dir does not exist on the farm's "
                              "node") from None
        except OSError as exc:
            raise RunNotFound("run_dir cannot be read: %s"
                              % exc.strerror) from None
        if not stat.S_ISDIR(info.st_mode):
            raise RunNotFound("run_dir is not a directory")
        self._check_owner(info, "run_dir")

        wandb_file, info = self._only_transaction_log(path)
        self._check_owner(info, "the run's .wandb file")
        return RunLocation(path, wandb_file)

    def is_allowed(self, resolved):
        """Whether a resolved path lies under one of the allowed roots."""
        for root in self.allow_roots:
            try:
                if os.path.commonpath([root, resolved]) == root:
                    return True
            except ValueError:      # mixes absolute and relative paths
                continue
        return False

    def _check_owner(self, info, what):
        if info.st_uid == self.uid:
            return
        if self.allow_group and info.st_gid in self.gids:
            return
        raise Forbidden("%s is not owned by the farm's user" % what)

    @staticmethod
    def _only_transaction_log(run_dir):
        try:
            names = os.listdir(run_dir)
        except OSError as exc:
            raise RunNotFound("run_dir cannot be listed: %s"
                              % exc.strerror) from None
        logs = [n for n in names
                if n.startswith("run-") and n.endswith(".wandb")]
        if not logs:
            raise RunNotFound("run_dir holds no run-*.wandb file")
        if len(logs) > 1:
            raise RunNotFound("run_dir holds %d run-*.wandb files; "
                              "expected one" % len(logs))
        path = os.path.join(run_dir, logs[0])
        try:
            info = os.lstat(path)
        except OSError as exc:      # removed since the listing
            raise RunNotFound("the run's .wandb file cannot be read: %s"
                              % exc.strerror) from None
        if not stat.S_ISREG(info.st_mode):
            raise Forbidden("the run's .wandb file is not a regular file")
        return path, info
