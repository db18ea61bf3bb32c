"""``wandb_sync_farm gen-cert``: the files it makes, and that the real
agent trusts a farm serving them."""

import http.client
import os
import socket
import ssl
import stat
import subprocess
import sys
import warnings

import pytest

from wandb_offline_sync import certs, protocol
from wandb_offline_sync.agent import Agent, FarmWarning
from wandb_offline_sync.farm import EXIT_FAILED, Farm
from wandb_offline_sync.rundirs import RunDirPolicy
from wandb_offline_sync.server import make_server_context
from wandb_offline_sync.wandbcli import WandbCli

from conftest import (
    PASSWORD, USERNAME, FarmClient, make_run_dir, wait_until)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gen_cert(folder, *more, env=None):
    return subprocess.run(
        [sys.executable, "-m", "wandb_offline_sync.farm", "gen-cert",
         "--cert", os.path.join(str(folder), "cert.pem"),
         "--key", os.path.join(str(folder), "key.pem")] + list(more),
        env=dict(env or os.environ, PYTHONPATH=REPO), timeout=60,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True)


def _alt_names(cert):
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", cert], check=True,
        stdout=subprocess.PIPE, universal_newlines=True).stdout
    line = text.split("Subject Alternative Name:", 1)[1].strip()
    return [name.strip() for name in line.splitlines()[0].split(",")]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A certificate and key made by gen-cert, and what it printed."""
    folder = tmp_path_factory.mktemp("gen-cert")
    done = _gen_cert(folder, "--name", "farm.example", "--days", "2")
    assert done.returncode == 0, done.stderr
    return (str(folder / "cert.pem"), str(folder / "key.pem"), done)


def test_gen_cert_writes_a_private_key_and_says_how_to_use_it(generated):
    cert, key, done = generated

    assert os.path.isfile(cert)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert "export %s=%s\n" % (protocol.ENV_CERT, cert) in done.stdout
    assert "--cert %s --key %s" % (cert, key) in done.stdout
    assert done.stderr == ""
    assert not [name for name in os.listdir(os.path.dirname(cert))
                if name.startswith(".gen-cert-")]


def test_certificate_names_this_host_and_the_names_given(generated):
    names = _alt_names(generated[0])

    for name in ("DNS:localhost", "IP Address:127.0.0.1",
                 "IP Address:0:0:0:0:0:0:0:1", "DNS:farm.example"):
        assert name in names


def test_existing_files_are_kept_without_force(generated, tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("mine\n")

    done = _gen_cert(tmp_path)

    assert done.returncode == EXIT_FAILED
    assert len(done.stderr.splitlines()) == 1
    assert "--force" in done.stderr
    assert cert.read_text() == "mine\n"
    assert not (tmp_path / "key.pem").exists()


def test_force_replaces_existing_files(tmp_path):
    (tmp_path / "cert.pem").write_text("old\n")
    key = tmp_path / "key.pem"
    key.write_text("old\n")
    key.chmod(0o644)

    done = _gen_cert(tmp_path, "--force")

    assert done.returncode == 0, done.stderr
    assert "BEGIN CERTIFICATE" in (tmp_path / "cert.pem").read_text()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_missing_openssl_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()

    done = _gen_cert(tmp_path, env=dict(os.environ, PATH=str(empty)))

    assert done.returncode == EXIT_FAILED
    assert len(done.stderr.splitlines()) == 1
    assert "openssl command is not installed" in done.stderr


def test_bad_names_are_refused_before_openssl_runs(tmp_path):
    with pytest.raises(certs.CertError):
        certs.make_certificate(str(tmp_path / "c.pem"),
                               str(tmp_path / "k.pem"),
                               ["ok.example", "bad,name\n[x]"])
    assert os.listdir(str(tmp_path)) == []


def test_host_names_include_loopback_and_this_host():
    names = certs.host_names()

    for name in (socket.gethostname(), "localhost", "127.0.0.1", "::1"):
        assert name in names
    assert len(names) == len(set(names))


@pytest.fixture
def farm_with(stand_in, tmp_path):
    """Start a farm on 127.0.0.1 serving a given certificate and key."""
    farms = []

    def start(cert, key):
        cli = WandbCli(stand_in.command, timeout=30,
                       work_root=str(tmp_path / "farm-work"),
                       environ=stand_in.environ)
        farm = Farm(("127.0.0.1", 0),
                    ssl_context=make_server_context(cert, key),
                    username=USERNAME, password=PASSWORD,
                    policy=RunDirPolicy(allow_roots=[str(tmp_path)]),
                    cli=cli, num_threads=1).start()
        farms.append(farm)
        return farm

    yield start
    for farm in farms:
        farm.close()


def _agent(farm, cert, run_dir, final_timeout=5.0):
    address = protocol.FarmAddress(host="127.0.0.1", port=farm.port,
                                   username=USERNAME, password=PASSWORD,
                                   cert=cert)
    return Agent(address=address, run_dir=run_dir,
                 final_timeout=final_timeout, timeout=2.0)


def test_agent_pinned_to_the_generated_certificate_is_served(
        generated, farm_with, stand_in, tmp_path):
    cert, key, _ = generated
    farm = farm_with(cert, key)
    run_dir = make_run_dir(tmp_path, "gc1")

    with warnings.catch_warnings():
        warnings.simplefilter("error", FarmWarning)
        accepted = _agent(farm, cert, run_dir).finish()

    assert accepted is True
    client = FarmClient(farm.port, cert)
    assert client.run(run_dir)["final_requested"] is True
    assert wait_until(lambda: stand_in.calls(), 10)


def test_agent_pinned_to_another_certificate_is_refused(
        generated, farm_with, certificate, tmp_path):
    farm = farm_with(generated[0], generated[1])
    run_dir = make_run_dir(tmp_path, "gc2")

    with pytest.warns(FarmWarning) as warned:
        accepted = _agent(farm, certificate[0], run_dir,
                          final_timeout=1.0).finish()

    assert accepted is False
    assert "did not show the certificate" in str(warned[0].message)
    assert FarmClient(farm.port, generated[0]).run(run_dir) is None


@pytest.mark.parametrize("host_name", ["localhost", "127.0.0.1"])
def test_clients_checking_the_host_name_accept_it(generated, farm_with,
                                                  host_name):
    cert, key, _ = generated
    farm = farm_with(cert, key)
    context = ssl.create_default_context(cafile=cert)   # checks names
    connection = http.client.HTTPSConnection(
        host_name, farm.port, context=context, timeout=10)
    try:
        connection.request("GET", protocol.STATUS_PATH)
        status = connection.getresponse().status
    finally:
        connection.close()

    assert status == 401            # through TLS; no credentials sent
