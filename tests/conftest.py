"""Fixtures: a TLS certificate made with openssl, real farms on port 0,
run directories, and the scripted stand-in for the wandb CLI."""

import base64
import http.client
import json
import os
import ssl
import subprocess
import sys
import time

import pytest

from wandb_offline_sync import protocol
from wandb_offline_sync.farm import Farm
from wandb_offline_sync.rundirs import RunDirPolicy
from wandb_offline_sync.server import make_server_context
from wandb_offline_sync.wandbcli import WandbCli

HERE = os.path.dirname(os.path.abspath(__file__))
STAND_IN = os.path.join(HERE, "stand_in_wandb.py")
USERNAME = "farmer"
PASSWORD = "s3cret pass:word"


def make_certificate(folder):
    """A self-signed certificate and key for 127.0.0.1 and localhost."""
    cert = os.path.join(folder, "cert.pem")
    key = os.path.join(folder, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-subj", "/CN=wandb-sync-farm-test", "-addext",
         "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
         "-keyout", key, "-out", cert],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    return cert, key


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    return make_certificate(str(tmp_path_factory.mktemp("tls")))


def make_run_dir(root, run_id="abc123", offline=True, content=b""):
    """An offline run directory as wandb lays it out, with its log."""
    prefix = "offline-run" if offline else "run"
    run_dir = os.path.join(str(root), "wandb",
                           "%s-20261203_120000-%s" % (prefix, run_id))
    os.makedirs(os.path.join(run_dir, "files"), exist_ok=True)
    with open(os.path.join(run_dir, "run-%s.wandb" % run_id), "wb") as f:
        f.write(content)
    return run_dir


class StandIn:
    """Controls the stand-in wandb CLI through files in ``folder``."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.command = [sys.executable, STAND_IN]
        self.environ = dict(os.environ, STAND_IN_DIR=self.folder)

    def behave(self, **spec):
        with open(os.path.join(self.folder, "behaviour.json"), "w") as f:
            json.dump(spec, f)

    def calls(self, event="start"):
        try:
            with open(os.path.join(self.folder, "calls.jsonl")) as f:
                records = [json.loads(line) for line in f]
        except FileNotFoundError:
            return []
        return [r for r in records if r["event"] == event]

    def pids(self):
        try:
            with open(os.path.join(self.folder, "pids.txt")) as f:
                return [int(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


@pytest.fixture
def stand_in(tmp_path):
    folder = tmp_path / "stand_in"
    folder.mkdir()
    return StandIn(folder)


class FarmClient:
    """Talks HTTPS to a farm the way a test needs to."""

    def __init__(self, port, cert, host="127.0.0.1"):
        self.host = host
        self.port = port
        self.cert = cert
        self.context = ssl.create_default_context(cafile=cert)
        self.context.check_hostname = False

    def request(self, method, path, body=None, headers=None,
                auth=(USERNAME, PASSWORD)):
        """Return (status, headers, decoded JSON body or raw bytes)."""
        headers = dict(headers or {})
        if auth is not None:
            token = base64.b64encode(
                ("%s:%s" % auth).encode("utf-8")).decode("ascii")
            headers.setdefault("Authorization", "Basic " + token)
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        connection = http.client.HTTPSConnection(
            self.host, self.port, context=self.context, timeout=15)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        try:
            payload = json.loads(raw.decode("utf-8"))
        except ValueError:
            payload = raw
        return response.status, response.headers, payload

    def sync(self, run_dir, final=False, run_id=None):
        return self.request("POST", protocol.SYNC_PATH,
                            {"run_dir": run_dir, "run_id": run_id,
                             "final": final})

    def status(self):
        status, _, payload = self.request("GET", protocol.STATUS_PATH)
        assert status == 200
        return payload

    def run(self, run_dir):
        for record in self.status()["runs"]:
            if record["run_dir"] == os.path.realpath(run_dir):
                return record
        return None


def wait_until(predicate, timeout, interval=0.05):
    """Poll ``predicate`` until it is true; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture
def start_farm(certificate, tmp_path):
    """Start in-process farms on 127.0.0.1 port 0; closed after the test.

    Returns (farm, client).  ``command``/``environ`` choose the wandb CLI.
    """
    farms = []

    def start(command, *, environ=None, timeout=30.0, num_threads=2,
              allow_roots=None, path_maps=(), scheduler_settings=None,
              host="127.0.0.1", live=False, live_interval=1.0, store=None):
        cert, key = certificate
        cli = WandbCli(command, timeout=timeout,
                       work_root=str(tmp_path / "farm-work"),
                       environ=environ)
        policy = RunDirPolicy(allow_roots=allow_roots or [str(tmp_path)],
                              path_maps=path_maps)
        farm = Farm((host, 0), ssl_context=make_server_context(cert, key),
                    username=USERNAME, password=PASSWORD, policy=policy,
                    cli=cli, num_threads=num_threads, live=live,
                    live_interval=live_interval, store=store,
                    scheduler_settings=scheduler_settings).start()
        farms.append(farm)
        return farm, FarmClient(farm.port, cert, host=host)

    yield start
    for farm in farms:
        farm.close()
