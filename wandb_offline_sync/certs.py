"""``wandb_sync_farm gen-cert``: a self-signed certificate for the farm.

Runs the ``openssl`` command (an argv list, no shell, nothing read from
stdin) to make an EC P-256 key and a self-signed certificate naming this
host's names and addresses, so agents can pin it with
``WANDB_SYNC_FARM_CERT`` and other clients can also check the host name.

The files are made in a private temporary directory beside the key and
moved into place at the end, so the key is never readable by others, not
even for a moment, and a failure leaves no half-written files.  Existing
files are kept unless ``--force`` is given.

The openssl configuration is written out in full rather than taken from
the system's ``openssl.cnf``, so the certificate is the same on every
cluster: it is its own CA (``CA:TRUE``, ``keyCertSign``), which is what an
agent that trusts only this certificate needs, with the key identifiers
and critical basic constraints that strict verification (Python 3.13's
default) asks for.
"""

import argparse
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

from . import protocol
from .errors import WandbSyncError
from .farm import EXIT_FAILED, EXIT_OK, build_parser as build_farm_parser

__all__ = ["main", "build_parser", "make_certificate", "host_names",
           "CertError", "DEFAULT_DAYS"]

#: How long a new certificate is valid, in days.
DEFAULT_DAYS = 3650
#: Seconds each openssl command may take.
OPENSSL_TIMEOUT = 60.0

# What a DNS name in the certificate may look like (a leading "*." too).
_DNS_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}"
                       r"[A-Za-z0-9_])?$")
# openssl limits the common name to 64 characters.
_MAX_COMMON_NAME = 64

_CONFIG = """\
[req]
prompt = no
distinguished_name = dn
x509_extensions = farm

[dn]
CN = {common_name}

[farm]
basicConstraints = critical, CA:TRUE
keyUsage = critical, digitalSignature, keyCertSign
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = {alt_names}
"""


class CertError(WandbSyncError):
    """The certificate could not be made; the message says why."""


def build_parser():
    farm_defaults = build_farm_parser()
    parser = argparse.ArgumentParser(
        prog="wandb_sync_farm gen-cert",
        description="Make a self-signed TLS certificate and key for the "
                    "farm, valid for this host's names and addresses.")
    parser.add_argument(
        "--cert", default=farm_defaults.get_default("cert"),
        help="where to write the certificate (default: %(default)s)")
    parser.add_argument(
        "--key", default=farm_defaults.get_default("key"),
        help="where to write the private key, readable by you only "
             "(default: %(default)s)")
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS,
        help="days the certificate is valid (default: %(default)s)")
    parser.add_argument(
        "--name", action="append", default=[], metavar="NAME",
        help="another host name or address agents use to reach the "
             "farm; repeatable")
    parser.add_argument(
        "--force", action="store_true",
        help="replace existing certificate and key files")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.days < 1:
        parser.error("--days must be at least 1")
    for name in args.name:
        if not _is_valid_name(name):
            parser.error("--name %r is neither a host name nor an IP "
                         "address" % name)
    cert = os.path.abspath(os.path.expanduser(args.cert))
    key = os.path.abspath(os.path.expanduser(args.key))
    if cert == key:
        parser.error("--cert and --key must be different files")

    for path in (cert, key):
        if os.path.isdir(path):
            parser.error("%s is a directory; give a file name" % path)
    existing = [path for path in (cert, key) if os.path.lexists(path)]
    if existing and not args.force:
        _fail("%s already %s; give --force to replace %s (agents "
              "pinned to the old certificate then need the new one)"
              % (" and ".join(existing),
                 "exists" if len(existing) == 1 else "exist",
                 "it" if len(existing) == 1 else "them"))
        return EXIT_FAILED
    names = _unique(host_names() + args.name)
    try:
        make_certificate(cert, key, names, days=args.days)
    except CertError as exc:
        _fail(str(exc))
        return EXIT_FAILED

    print("wrote the certificate %s (valid %d days for %s)"
          % (cert, args.days, ", ".join(names)))
    print("wrote the key %s (readable by you only; it stays on this node)"
          % key)
    print("start the farm with:")
    print("    wandb_sync_farm --cert %s --key %s"
          % (shlex.quote(cert), shlex.quote(key)))
    print("and give agents the certificate (not the key):")
    print("    export %s=%s" % (protocol.ENV_CERT, shlex.quote(cert)))
    return EXIT_OK


def host_names():
    """This host's names and addresses, for the certificate.

    The host name and fully qualified name, ``localhost``, the loopback
    addresses, and what the host name resolves to.  Lookups that fail are
    skipped: a node without DNS still gets a certificate for the rest.
    """
    own = []
    for lookup in (socket.gethostname, socket.getfqdn):
        try:
            own.append(lookup())
        except OSError:
            pass
    names = own + ["localhost", "127.0.0.1", "::1"]
    for name in _unique(own):
        try:
            infos = socket.getaddrinfo(name, None)
        except (OSError, UnicodeError):
            continue
        names += [info[4][0] for info in infos]
    return _unique(n for n in names if _is_valid_name(n))


def make_certificate(cert, key, names, days=DEFAULT_DAYS,
                     openssl="openssl"):
    """Write a self-signed certificate for ``names`` and its key.

    ``names`` are host names and IP addresses; the first is also the
    certificate's common name.  Existing files are replaced.  The key
    file is mode 0600.  Raises CertError, with openssl's own last line
    when it fails.
    """
    names = list(names)
    if not names:
        raise CertError("a certificate needs at least one name")
    bad = [name for name in names if not _is_valid_name(name)]
    if bad:
        raise CertError("not a host name or IP address: %r" % bad[0])
    if shutil.which(openssl) is None:
        raise CertError("the %s command is not installed (not found on "
                        "PATH); gen-cert needs it" % openssl)
    key_dir = os.path.dirname(os.path.abspath(key))
    cert_dir = os.path.dirname(os.path.abspath(cert))
    try:
        os.makedirs(key_dir, mode=0o700, exist_ok=True)
        os.makedirs(cert_dir, exist_ok=True)
        # mkdtemp makes a directory only we can enter (mode 0700).
        work = tempfile.mkdtemp(prefix=".gen-cert-", dir=key_dir)
    except OSError as exc:
        raise CertError("cannot write into %s: %s"
                        % (key_dir, exc.strerror)) from None

    try:
        new_key = os.path.join(work, "key.pem")
        new_cert = os.path.join(work, "cert.pem")
        config = os.path.join(work, "openssl.cnf")
        with open(config, "w") as f:
            f.write(_CONFIG.format(
                common_name=_common_name(names),
                alt_names=", ".join(_alt_name(n) for n in names)))
        _run_openssl([openssl, "genpkey", "-algorithm", "EC",
                      "-pkeyopt", "ec_paramgen_curve:P-256",
                      "-pkeyopt", "ec_param_enc:named_curve",
                      "-out", new_key])
        os.chmod(new_key, 0o600)
        _run_openssl([openssl, "req", "-new", "-x509", "-config", config,
                      "-key", new_key, "-sha256", "-days", str(days),
                      "-set_serial", str(_serial()), "-out", new_cert])
        os.replace(new_key, key)
        shutil.move(new_cert, cert)
    except OSError as exc:
        raise CertError("cannot write the certificate or key: %s"
                        % exc) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_openssl(argv):
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, timeout=OPENSSL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CertError("%s %s did not finish in %.0f s"
                        % (argv[0], argv[1], OPENSSL_TIMEOUT)) from None
    except OSError as exc:
        raise CertError("cannot run %s: %s" % (argv[0], exc.strerror)) \
            from None
    if done.returncode != 0:
        lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
        raise CertError("%s %s failed with exit code %d: %s"
                        % (argv[0], argv[1], done.returncode,
                           lines[-1] if lines else "no output"))


def _is_valid_name(name):
    return _ip(name) is not None or bool(_DNS_NAME.match(name))


def _ip(name):
    if "%" in name:
        return None     # a scoped IPv6 address; openssl takes none
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _alt_name(name):
    address = _ip(name)
    if address is not None:
        return "IP:%s" % address
    return "DNS:%s" % name


def _common_name(names):
    dns = [n for n in names if _ip(n) is None and len(n) <= _MAX_COMMON_NAME]
    return dns[0] if dns else "wandb_sync_farm"


def _serial():
    # A random serial, as RFC 5280 section 4.1.2.2 asks of a CA: two
    # certificates made on the same host must not share one, or browsers
    # refuse the second.
    return int.from_bytes(os.urandom(16), "big") >> 1


def _unique(items):
    seen = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _fail(message):
    print("wandb_sync_farm gen-cert: error: %s" % message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
