"""``wandb_sync_farm status`` against real farms over real TLS."""

import json
import socket

import pytest

from wandb_offline_sync import farm as farm_cli
from wandb_offline_sync import protocol, statuscmd
from wandb_offline_sync.farm import EXIT_FAILED

from conftest import (
    PASSWORD, USERNAME, make_certificate, make_run_dir, wait_until)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch):
    for name in (protocol.ENV_HOST, protocol.ENV_PORT, protocol.ENV_USERNAME,
                 protocol.ENV_PASSWORD, protocol.ENV_CERT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "100")


def _argv(farm, cert, password=PASSWORD):
    return ["--host", "127.0.0.1", "--port", str(farm.port),
            "--username", USERNAME, "--password", password, "--cert", cert]


def _synced_farm(start_farm, stand_in, tmp_path, run_id="r1"):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, run_id)
    client.sync(run_dir, run_id=run_id)
    assert wait_until(lambda: client.run(run_dir)["state"] == "idle", 10)
    return farm, client


def test_table_lists_each_run_with_its_state(start_farm, stand_in,
                                             tmp_path, certificate, capsys):
    farm, _ = _synced_farm(start_farm, stand_in, tmp_path)

    code = statuscmd.main(_argv(farm, certificate[0]))

    out, err = capsys.readouterr()
    assert code == 0
    assert err == ""
    lines = out.splitlines()
    heading = next(line for line in lines if line.startswith("RUN"))
    for column in ("STATE", "LAST SYNC AGO", "ATTEMPTS", "FINAL",
                   "LAST ERROR"):
        assert column in heading
    row = next(line for line in lines if line.startswith("r1 "))
    assert row.split()[:2] == ["r1", "idle"]
    assert " s " in row                 # synced seconds ago


def test_json_is_the_farms_status(start_farm, stand_in, tmp_path,
                                  certificate, capsys):
    farm, client = _synced_farm(start_farm, stand_in, tmp_path)

    code = statuscmd.main(_argv(farm, certificate[0]) + ["--json"])

    status = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [run["run_id"] for run in status["runs"]] == ["r1"]
    assert status["farm"]["version"] == client.status()["farm"]["version"]


def test_settings_come_from_the_agents_environment(
        start_farm, stand_in, tmp_path, certificate, capsys, monkeypatch):
    farm, _ = _synced_farm(start_farm, stand_in, tmp_path)
    monkeypatch.setenv(protocol.ENV_HOST, "127.0.0.1")
    monkeypatch.setenv(protocol.ENV_PORT, str(farm.port))
    monkeypatch.setenv(protocol.ENV_USERNAME, USERNAME)
    monkeypatch.setenv(protocol.ENV_PASSWORD, PASSWORD)
    monkeypatch.setenv(protocol.ENV_CERT, certificate[0])

    code = farm_cli.main(["status"])

    assert code == 0
    assert "r1 " in capsys.readouterr().out


def test_long_errors_are_cut_to_the_terminal_width(
        start_farm, stand_in, tmp_path, certificate, capsys):
    stand_in.behave(mode="error", line="wandb: ERROR " + "x" * 300)
    farm, client = start_farm(stand_in.command, environ=stand_in.environ,
                              scheduler_settings={"backoff_base": 60})
    run_dir = make_run_dir(tmp_path, "r2")
    client.sync(run_dir, run_id="r2")
    assert wait_until(lambda: client.run(run_dir)["attempts"] == 1, 10)

    assert statuscmd.main(_argv(farm, certificate[0])) == 0

    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("r2 "))
    assert "retry_wait" in row
    assert "wandb reported an error: xxx" in row
    assert row.endswith("...")
    assert len(row) < 100


def test_without_a_certificate_it_connects_and_says_it_did_not_check(
        start_farm, stand_in, tmp_path, capsys):
    farm, _ = _synced_farm(start_farm, stand_in, tmp_path)
    argv = _argv(farm, "")[:-2]

    code = statuscmd.main(argv)

    out, err = capsys.readouterr()
    assert code == 0
    assert "r1 " in out
    assert len(err.splitlines()) == 1
    assert "not checked" in err


def test_wrong_password_is_one_line_and_exit_failed(
        start_farm, stand_in, certificate, capsys):
    farm, _ = start_farm(stand_in.command, environ=stand_in.environ)

    code = statuscmd.main(_argv(farm, certificate[0], password="wrong"))

    out, err = capsys.readouterr()
    assert code == EXIT_FAILED
    assert out == ""
    assert len(err.splitlines()) == 1
    assert "401" in err and protocol.ENV_PASSWORD in err
    assert "wrong" not in err


def test_farm_down_is_one_line_and_exit_failed(certificate, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]        # closed again: nobody listens

    code = statuscmd.main(["--host", "127.0.0.1", "--port", str(port),
                           "--cert", certificate[0]])

    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    assert len(err.splitlines()) == 1
    assert "cannot reach the farm at https://127.0.0.1:%d" % port in err


def test_another_certificate_is_refused_in_one_line(
        start_farm, stand_in, tmp_path, capsys):
    farm, _ = start_farm(stand_in.command, environ=stand_in.environ)
    other_cert, _ = make_certificate(str(tmp_path))

    code = statuscmd.main(_argv(farm, other_cert))

    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    assert len(err.splitlines()) == 1
    assert "did not show the certificate in %s" % other_cert in err


def test_unreadable_certificate_file_is_one_line(tmp_path, capsys):
    code = statuscmd.main(["--port", "1", "--cert",
                           str(tmp_path / "missing.pem")])

    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    assert len(err.splitlines()) == 1
    assert "cannot use the certificate" in err


def test_table_of_an_empty_farm_is_its_header_line():
    text = statuscmd.format_table(
        {"farm": {"version": "0.1.0", "wandb": "wandb 0.31.0",
                  "started": 1000.0}, "runs": []}, now=1090.0)

    assert text == "farm 0.1.0 (wandb 0.31.0), up 90 s, 0 runs"


def test_control_characters_from_clients_do_not_reach_the_terminal():
    run = {"run_id": "r3", "state": "failed", "attempts": 1,
           "last_attempt": {"outcome": "permanent",
                            "reason": "bad \x1b]0;pwned\x07 text"}}
    text = statuscmd.format_table({"runs": [run]}, now=0.0)

    assert "\x1b" not in text and "\x07" not in text
    assert "bad ?]0;pwned? text" in text


def test_live_runs_show_live_instead_of_an_age():
    run = {"run_id": "r4", "state": "live", "attempts": 0,
           "last_success": None,
           "live": {"alive": True, "started": 880.0, "last_error": None}}
    text = statuscmd.format_table(
        {"farm": {"mode": "live"}, "runs": [run]}, now=1000.0)

    assert "live mode" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if line.startswith("r4"))
    assert row.split()[:4] == ["r4", "live", "live", "for"]
    assert "2 min" in row
