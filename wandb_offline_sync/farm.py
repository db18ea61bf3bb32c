"""The ``wandb_sync_farm`` command: check the setup, then serve.

Everything that can be wrong with the setup (certificate, key, the wandb
CLI, the W&B API key, the port) is checked before the farm starts taking
requests, and reported in one line with a named exit code.  Signal
handlers only set an event; the main thread shuts the server down, stops
running syncs and exits 0.

Also runnable as ``python -m wandb_offline_sync.farm``.
"""

import argparse
import fcntl
import importlib
import logging
import netrc
import os
import shlex
import signal
import ssl
import sys
import threading
import time
from urllib.parse import urlsplit

from . import __version__, protocol
from .errors import ConfigError
from .page import render as render_page
from .rundirs import RunDirPolicy, parse_path_map
from .scheduler import LIVE_MODE, PERIODIC_MODE, SyncScheduler
from .state import StateStore
from .server import FarmServer, make_server_context
from .wandbcli import WandbCli

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_USAGE", "EXIT_CONFIG"]

log = logging.getLogger(__name__)

# Exit codes.
EXIT_OK = 0
EXIT_USAGE = 2          # argparse's own
EXIT_CONFIG = 3         # the farm cannot start as configured
EXIT_FAILED = 4         # a subcommand could not do its job

DEFAULT_NUM_THREADS = 5
DEFAULT_SYNC_TIMEOUT = 900.0
DEFAULT_LIVE_INTERVAL = 2.0


def _default_state_dir():
    base = os.environ.get("XDG_STATE_HOME") or \
        os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "wandb_offline_sync")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="wandb_sync_farm",
        description="Serve sync requests from wandb-offline-sync agents "
                    "and run `wandb sync` on their run directories.",
        epilog="Other commands: `wandb_sync_farm status` shows the runs "
               "a farm knows; `wandb_sync_farm gen-cert` makes its "
               "certificate.")
    parser.add_argument(
        "--host", default=protocol.DEFAULT_BIND,
        help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=None,
        help="port to listen on (default: $%s or %d)"
             % (protocol.ENV_PORT, protocol.DEFAULT_PORT))
    parser.add_argument(
        "--cert", default="cert.pem",
        help="TLS certificate in PEM (default: %(default)s)")
    parser.add_argument(
        "--key", default="key.pem",
        help="TLS private key in PEM (default: %(default)s)")
    parser.add_argument(
        "--num_threads", "--num-threads", dest="num_threads", type=int,
        default=DEFAULT_NUM_THREADS,
        help="most syncs running at once (default: %(default)s)")
    parser.add_argument(
        "--sync-timeout", type=float, default=DEFAULT_SYNC_TIMEOUT,
        help="seconds before a sync is killed and retried "
             "(default: %(default)s)")
    parser.add_argument(
        "--allow-root", action="append", metavar="DIR",
        help="only sync run directories under DIR; repeatable (default: "
             "your home directory)")
    parser.add_argument(
        "--path-map", action="append", metavar="FROM=TO", default=[],
        help="rewrite a requested path prefix FROM to TO before checking "
             "it, for nodes that mount the filesystem elsewhere; "
             "repeatable")
    parser.add_argument(
        "--allow-group", action="store_true",
        help="also sync runs owned by a group you are in (default: only "
             "your own)")
    parser.add_argument(
        "--state-dir", default=_default_state_dir(),
        help="where the farm keeps its state and scratch directories "
             "(default: %(default)s)")
    parser.add_argument(
        "--wandb-command", default="wandb",
        help="how to run the wandb CLI, split like a shell would "
             "(default: %(default)s)")
    parser.add_argument(
        "--mode", choices=(LIVE_MODE, PERIODIC_MODE), default=None,
        help="live: follow each run with `wandb beta sync --live`; "
             "periodic: run `wandb sync` per request (default: live when "
             "the installed wandb offers it)")
    parser.add_argument(
        "--live-interval", type=float, default=DEFAULT_LIVE_INTERVAL,
        help="seconds between a live sync's sends to W&B, whole seconds "
             "(default: %(default)s)")
    parser.add_argument(
        "--live-grace", type=float, default=SyncScheduler.live_grace,
        help="seconds a live sync may take to end after the run's final "
             "request (default: %(default)s)")
    parser.add_argument(
        "--live-group-size", type=int, default=SyncScheduler.live_group_size,
        help="runs one live sync process follows at most "
             "(default: %(default)s)")
    parser.add_argument(
        "--max-live-processes", type=int,
        default=SyncScheduler.max_live_processes,
        help="live sync processes at most, about 120 MB each; runs "
             "beyond are synced periodically (default: %(default)s)")
    parser.add_argument(
        "--max-live", type=int, default=SyncScheduler.max_live,
        help="live syncs at most at once; further runs are synced "
             "periodically (default: %(default)s)")
    parser.add_argument(
        "--stale-after", type=float, default=SyncScheduler.stale_after,
        help="seconds without requests and without log growth after "
             "which a run counts as ended without its final request "
             "(default: %(default)s)")
    parser.add_argument(
        "--verbose", action="store_true",
        help="log debug messages and everything wandb prints")
    parser.add_argument(
        "--version", action="version", version="%(prog)s " + __version__)
    return parser


# Subcommands beside serving, each a module with main(argv) -> exit code,
# imported only when used.
_SUBCOMMANDS = {
    "status": "wandb_offline_sync.statuscmd",
    "gen-cert": "wandb_offline_sync.certs",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _SUBCOMMANDS:
        module = importlib.import_module(_SUBCOMMANDS[argv[0]])
        return module.main(argv[1:])
    if "--generate-cert" in argv:
        argv.remove("--generate-cert")
        return importlib.import_module(_SUBCOMMANDS["gen-cert"]).main(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(args)
    except ConfigError as exc:
        if args.verbose:
            log.exception("cannot start")
        print("wandb_sync_farm: error: %s" % exc, file=sys.stderr)
        return EXIT_CONFIG


def serve(args):
    """Check the setup described by ``args``, then serve until a signal."""
    context = _load_tls(args.cert, args.key)
    port = args.port
    if port is None:
        port = _env_port()
    if not 0 <= port <= 65535:
        raise ConfigError("--port %d is out of range (0 to 65535)" % port)
    username = os.environ.get(protocol.ENV_USERNAME)
    password = os.environ.get(protocol.ENV_PASSWORD)
    default_credentials = not username or not password
    username = username or protocol.DEFAULT_USERNAME
    password = password or protocol.DEFAULT_PASSWORD
    if args.num_threads < 1:
        raise ConfigError("--num_threads must be at least 1")
    if args.sync_timeout <= 0:
        raise ConfigError("--sync-timeout must be positive")
    policy = _make_policy(args)

    os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
    cli = WandbCli(shlex.split(args.wandb_command),
                   timeout=args.sync_timeout,
                   work_root=os.path.join(args.state_dir, "work"),
                   verbose=args.verbose)
    lock = _lock_state_dir(args.state_dir)
    wandb_version = cli.version()
    _check_api_key()
    mode, why = _choose_mode(args.mode, cli)
    for name in ("live_interval", "live_grace", "stale_after"):
        if getattr(args, name) <= 0:
            raise ConfigError("--%s must be positive"
                              % name.replace("_", "-"))

    info = {"version": __version__, "wandb": wandb_version, "mode": mode,
            "num_threads": args.num_threads,
            "sync_timeout": args.sync_timeout,
            "live_interval": args.live_interval,
            "live_group_size": args.live_group_size,
            "live_group_wait": SyncScheduler.live_group_wait,
            "max_live": args.max_live,
            "max_live_processes": args.max_live_processes,
            "stale_after": args.stale_after,
            "allow_roots": list(policy.allow_roots)}
    log.info("sync mode: %s (%s)", mode, why)
    if args.live_group_size < 1 or args.max_live < 0 or \
            args.max_live_processes < 1:
        raise ConfigError("--live-group-size and --max-live-processes "
                          "must be at least 1, --max-live at least 0")
    settings = {"live_grace": args.live_grace, "max_live": args.max_live,
                "live_group_size": args.live_group_size,
                "max_live_processes": args.max_live_processes,
                "stale_after": args.stale_after}
    try:
        farm = Farm((args.host, port), ssl_context=context,
                    username=username, password=password, policy=policy,
                    cli=cli, num_threads=args.num_threads, farm_info=info,
                    live=mode == LIVE_MODE,
                    live_interval=args.live_interval,
                    store=StateStore(args.state_dir),
                    scheduler_settings=settings)
    except OSError as exc:
        raise ConfigError("cannot listen on %s:%d: %s"
                          % (args.host, port, exc.strerror)) from None

    cli.end_leftovers()
    _log_start(farm.server, args, wandb_version, policy,
               default_credentials)
    stop = threading.Event()
    _install_signal_handlers(stop)
    farm.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("shutting down")
        farm.close()
    log.info("farm stopped")
    lock.close()
    return EXIT_OK


class Farm:
    """A farm put together: HTTPS server, scheduler and wandb CLI runner.

    ``start()`` serves in a background thread; ``close()`` stops taking
    requests, ends running syncs and waits for the threads.
    """

    def __init__(self, address, *, ssl_context, username, password, policy,
                 cli, num_threads=DEFAULT_NUM_THREADS, farm_info=None,
                 live=False, live_interval=DEFAULT_LIVE_INTERVAL,
                 store=None, scheduler_settings=None):
        self.cli = cli
        self.live_interval = live_interval
        self.scheduler = SyncScheduler(
            self._sync, start_live=self._start_live if live else None,
            max_workers=num_threads, store=store,
            **(scheduler_settings or {}))
        info = dict(farm_info or {})
        info.setdefault("version", __version__)
        info.setdefault("num_threads", num_threads)
        info.setdefault("mode", LIVE_MODE if live else PERIODIC_MODE)
        info["started"] = time.time()
        try:
            self.server = FarmServer(
                address, ssl_context=ssl_context, username=username,
                password=password, scheduler=self.scheduler, policy=policy,
                farm_info=info, page=render_page)
        except BaseException:
            self.scheduler.close(timeout=0)
            raise
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        name="farm-server", daemon=True)

    @property
    def port(self):
        return self.server.server_address[1]

    def _sync(self, record):
        return self.cli.sync(record.run_dir)

    def _start_live(self, records):
        return self.cli.start_live([r.run_dir for r in records],
                                   self.live_interval)

    def start(self):
        self._thread.start()
        return self

    def close(self):
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join(5.0)
        self.server.server_close()
        self.scheduler.stop_accepting()
        self.cli.close()
        self.scheduler.close()


def _choose_mode(requested, cli):
    """The sync mode to run in, and why."""
    live_ok = cli.supports_live()
    if requested == LIVE_MODE and not live_ok:
        raise ConfigError("--mode live needs `wandb beta sync --live`, "
                          "which the installed wandb does not offer")
    if requested:
        return requested, "chosen with --mode"
    if live_ok:
        return LIVE_MODE, "the installed wandb offers beta sync --live"
    return PERIODIC_MODE, "the installed wandb has no beta sync --live"


def _load_tls(cert, key):
    for what, path in (("certificate", cert), ("key", key)):
        if not os.path.isfile(path):
            raise ConfigError("no TLS %s at %s (make one with "
                              "`wandb_sync_farm gen-cert`)" % (what, path))
    try:
        return make_server_context(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("cannot load TLS certificate %s and key %s: %s"
                          % (cert, key, exc)) from None


def _env_port():
    text = os.environ.get(protocol.ENV_PORT)
    if not text:
        return protocol.DEFAULT_PORT
    try:
        port = int(text)
    except ValueError:
        raise ConfigError("%s=%r is not a port number"
                          % (protocol.ENV_PORT, text)) from None
    if not 0 <= port <= 65535:
        raise ConfigError("%s=%d is out of range" % (protocol.ENV_PORT,
                                                     port))
    return port


def _make_policy(args):
    roots = args.allow_root or [os.path.expanduser("~")]
    for root in roots:
        if not os.path.isdir(root):
            raise ConfigError("--allow-root %s is not a directory" % root)
    try:
        maps = [parse_path_map(text) for text in args.path_map]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return RunDirPolicy(allow_roots=roots, path_maps=maps,
                        allow_group=args.allow_group)


def _lock_state_dir(state_dir):
    """Hold a lock on ``state_dir`` while the farm runs; ConfigError if
    another farm holds it (it would share, and end, this one's syncs)."""
    path = os.path.join(state_dir, "farm.lock")
    lock = open(path, "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigError("another farm (pid %s) uses the state directory "
                          "%s; stop it or give --state-dir"
                          % (holder, state_dir)) from None
    lock.seek(0)
    lock.truncate()
    lock.write("%d\n" % os.getpid())
    lock.flush()
    return lock


def _check_api_key():
    """ConfigError unless wandb will find an API key."""
    key = os.environ.get("WANDB_API_KEY")
    if key:
        if len(key) < 40:
            raise ConfigError("WANDB_API_KEY has %d characters; W&B keys "
                              "have 40 or more" % len(key))
        return
    base_url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    host = urlsplit(base_url).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or \
        os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError("no W&B API key for %s: set WANDB_API_KEY or run "
                      "`wandb login` on this node" % host)


def _log_start(server, args, wandb_version, policy, default_credentials):
    host, port = server.server_address[:2]
    log.info("wandb_sync_farm %s with %s", __version__, wandb_version)
    log.info("listening on https://%s:%d (certificate %s)", host, port,
             os.path.abspath(args.cert))
    log.info("agents need: export %s=<this node's name> %s=%d %s=%s",
             protocol.ENV_HOST, protocol.ENV_PORT, port, protocol.ENV_CERT,
             os.path.abspath(args.cert))
    log.info("syncing runs under: %s", ", ".join(policy.allow_roots))
    log.info("up to %d syncs at once, each killed after %.0fs",
             args.num_threads, args.sync_timeout)
    if default_credentials:
        log.warning("using the default credentials %s/%s: anyone who can "
                    "reach this port can ask for syncs; set %s and %s",
                    protocol.DEFAULT_USERNAME, protocol.DEFAULT_PASSWORD,
                    protocol.ENV_USERNAME, protocol.ENV_PASSWORD)


def _install_signal_handlers(stop):
    def request_stop(signum, frame):
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)


if __name__ == "__main__":
    sys.exit(main())
