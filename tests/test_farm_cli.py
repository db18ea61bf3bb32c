"""The wandb_sync_farm command: setup checks, start-up log, shutdown."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from wandb_offline_sync import protocol
from wandb_offline_sync.farm import EXIT_CONFIG, build_parser

from conftest import (
    PASSWORD, USERNAME, FarmClient, STAND_IN, make_run_dir, wait_until)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tmp_path, stand_in_dir, **extra):
    env = dict(os.environ, PYTHONPATH=REPO, STAND_IN_DIR=str(stand_in_dir),
               WANDB_API_KEY="k" * 40, HOME=str(tmp_path))
    env.pop(protocol.ENV_USERNAME, None)
    env.pop(protocol.ENV_PASSWORD, None)
    env.update(extra)
    return env


def _argv(tmp_path, cert, key, *more):
    return [sys.executable, "-m", "wandb_offline_sync.farm",
            "--host", "127.0.0.1", "--port", "0", "--cert", cert,
            "--key", key, "--allow-root", str(tmp_path),
            "--state-dir", str(tmp_path / "state"),
            "--wandb-command", "%s %s" % (sys.executable, STAND_IN)] + \
        list(more)


def test_missing_certificate_is_one_clear_line(tmp_path, stand_in):
    done = subprocess.run(
        _argv(tmp_path, str(tmp_path / "no.pem"), str(tmp_path / "no.key")),
        env=_env(tmp_path, stand_in.folder), timeout=60,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert done.returncode == EXIT_CONFIG
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "no TLS certificate at" in lines[0]


def test_unreadable_key_is_one_clear_line(tmp_path, stand_in, certificate):
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("not a key\n")
    done = subprocess.run(
        _argv(tmp_path, certificate[0], str(bad_key)),
        env=_env(tmp_path, stand_in.folder), timeout=60,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert done.returncode == EXIT_CONFIG
    assert len(done.stderr.decode().strip().splitlines()) == 1


def test_missing_api_key_stops_the_farm(tmp_path, stand_in, certificate):
    env = _env(tmp_path, stand_in.folder)
    del env["WANDB_API_KEY"]
    done = subprocess.run(_argv(tmp_path, *certificate), env=env,
                          timeout=60, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    assert done.returncode == EXIT_CONFIG
    assert "no W&B API key" in done.stderr.decode()


def test_missing_wandb_cli_stops_the_farm(tmp_path, stand_in, certificate):
    argv = _argv(tmp_path, *certificate)
    argv[argv.index("--wandb-command") + 1] = str(tmp_path / "nowandb")
    done = subprocess.run(argv, env=_env(tmp_path, stand_in.folder),
                          timeout=60, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    assert done.returncode == EXIT_CONFIG
    assert "cannot run" in done.stderr.decode()


def test_num_threads_has_both_spellings():
    parser = build_parser()
    assert parser.parse_args(["--num_threads", "7"]).num_threads == 7
    assert parser.parse_args(["--num-threads", "3"]).num_threads == 3
    assert parser.parse_args([]).num_threads == 5


@contextlib.contextmanager
def _farm_process(argv, env):
    """The farm command running with ``argv``; killed if still running."""
    farm = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        yield farm
    finally:
        if farm.poll() is None:
            farm.kill()
            farm.wait()
        farm.stdout.close()
        farm.stderr.close()


def _listening_port(farm):
    """Read the farm's log until it says where it listens."""
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = farm.stderr.readline().decode()
        lines.append(line)
        if "listening on https://" in line:
            return int(line.split("(")[0].rsplit(":", 1)[1]), lines
    raise AssertionError("farm did not start:\n" + "".join(lines))


def test_sigterm_stops_the_farm_and_its_syncs(tmp_path, stand_in,
                                              certificate):
    stand_in.behave(mode="hang")
    env = _env(tmp_path, stand_in.folder,
               **{protocol.ENV_USERNAME: USERNAME,
                  protocol.ENV_PASSWORD: PASSWORD})
    with _farm_process(_argv(tmp_path, *certificate), env) as farm:
        port, lines = _listening_port(farm)
        client = FarmClient(port, certificate[0])
        run_dir = make_run_dir(tmp_path, "c1")
        assert client.sync(run_dir)[0] == 202
        assert wait_until(lambda: len(stand_in.pids()) == 2, 15)

        farm.send_signal(signal.SIGTERM)
        code = farm.wait(30)
    assert code == 0
    for pid in stand_in.pids():
        assert wait_until(lambda: not _running(pid), 5), pid
    assert not any("default credentials" in line for line in lines)


def test_default_credentials_are_warned_about(tmp_path, stand_in,
                                              certificate):
    with _farm_process(_argv(tmp_path, *certificate),
                       _env(tmp_path, stand_in.folder)) as farm:
        port, lines = _listening_port(farm)
        deadline = time.monotonic() + 10
        while not any("default credentials" in l for l in lines) and \
                time.monotonic() < deadline:
            lines.append(farm.stderr.readline().decode())
        client = FarmClient(port, certificate[0])
        status, _, _ = client.request("GET", "/status", auth=("user", "pass"))
        farm.send_signal(signal.SIGINT)
        assert farm.wait(30) == 0
    assert status == 200
    assert any("default credentials" in line for line in lines)


def _running(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_port_in_use_is_one_clear_line(tmp_path, stand_in, certificate):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = _argv(tmp_path, *certificate)
        argv[argv.index("--port") + 1] = str(taken.getsockname()[1])
        done = subprocess.run(argv, env=_env(tmp_path, stand_in.folder),
                              timeout=60, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert done.returncode == EXIT_CONFIG
    assert "cannot listen on" in done.stderr.decode()


def test_a_second_farm_on_the_same_state_dir_leaves_the_first_alone(
        tmp_path, stand_in, certificate):
    stand_in.behave(mode="hang")
    env = _env(tmp_path, stand_in.folder,
               **{protocol.ENV_USERNAME: USERNAME,
                  protocol.ENV_PASSWORD: PASSWORD})
    with _farm_process(_argv(tmp_path, *certificate), env) as farm:
        port, _ = _listening_port(farm)
        client = FarmClient(port, certificate[0])
        run_dir = make_run_dir(tmp_path, "c2")
        assert client.sync(run_dir)[0] == 202
        assert wait_until(lambda: len(stand_in.pids()) == 2, 15)

        second = subprocess.run(_argv(tmp_path, *certificate), env=env,
                                timeout=60, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

        assert second.returncode == EXIT_CONFIG
        assert "another farm" in second.stderr.decode()
        assert all(_running(pid) for pid in stand_in.pids())
        farm.send_signal(signal.SIGTERM)
        assert farm.wait(30) == 0


def test_port_out_of_range_is_one_clear_line(tmp_path, stand_in,
                                             certificate):
    argv = _argv(tmp_path, *certificate)
    argv[argv.index("--port") + 1] = "99999"
    done = subprocess.run(argv, env=_env(tmp_path, stand_in.folder),
                          timeout=60, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.decode().count("\n") == 1
    assert "out of range" in done.stderr.decode()
