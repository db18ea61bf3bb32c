"""The files in examples/: they parse, and the tmux script runs a farm."""

import configparser
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import (
    PASSWORD, USERNAME, FarmClient, STAND_IN, wait_until)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
UNIT = os.path.join(EXAMPLES, "wandb_sync_farm.service")
TMUX_SCRIPT = os.path.join(EXAMPLES, "farm_in_tmux.sh")


@pytest.mark.parametrize("script", ["slurm_job.sh", "farm_in_tmux.sh"])
def test_shell_scripts_parse(script):
    done = subprocess.run(["bash", "-n", os.path.join(EXAMPLES, script)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=30)
    assert done.returncode == 0, done.stdout.decode()


def test_slurm_job_runs_train_py_offline_with_the_farms_settings():
    with open(os.path.join(EXAMPLES, "slurm_job.sh")) as f:
        text = f.read()

    assert text.startswith("#!/bin/bash\n#SBATCH ")
    for line in ("export WANDB_MODE=offline",
                 "export WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=1",
                 "export WANDB_SYNC_FARM_HOST=",
                 "export WANDB_SYNC_FARM_PORT=",
                 "export WANDB_SYNC_FARM_CERT="):
        assert "\n" + line in text
    assert re.search(r"^exec python train\.py ", text, re.MULTILINE)


def test_train_py_compiles_and_takes_its_options(tmp_path):
    train = os.path.join(EXAMPLES, "train.py")
    py_compile.compile(train, cfile=str(tmp_path / "train.pyc"),
                       doraise=True)

    done = subprocess.run([sys.executable, train, "--help"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=60, env=dict(os.environ, PYTHONPATH=REPO))

    assert done.returncode == 0, done.stdout.decode()
    for option in ("--steps", "--sleep", "--frequency"):
        assert option in done.stdout.decode()


def _unit():
    # systemd units are not quite INI: no interpolation, keys keep their
    # case, and a key may repeat.
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    with open(UNIT) as f:
        parser.read_file(f)
    return parser


def test_unit_runs_the_farm_with_its_files_and_restarts_it():
    unit = _unit()
    service = unit["Service"]

    command = service["ExecStart"].replace("\\\n", " ").split()
    assert "wandb_sync_farm" in command
    assert command[0].startswith("/")          # systemd before 239
    assert command[command.index("--cert") + 1] == \
        "%h/.wandb_sync_farm/cert.pem"
    assert command[command.index("--key") + 1] == \
        "%h/.wandb_sync_farm/key.pem"
    assert service["EnvironmentFile"] == "%h/.wandb_sync_farm/env"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "default.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    copy = tmp_path / "wandb_sync_farm.service"
    shutil.copy(UNIT, str(copy))

    done = subprocess.run(["systemd-analyze", "verify", str(copy)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=60)

    output = done.stdout.decode()
    if "Failed to initialize manager" in output:
        pytest.skip("systemd-analyze cannot run here: " + output.strip())
    assert done.returncode == 0 and output == "", output


@pytest.fixture
def tmux_environ(tmp_path, certificate, stand_in):
    """Environment for the tmux script, with a tmux server of its own."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    # A short directory: tmux's socket path must fit in 108 bytes.
    sockets = tempfile.mkdtemp(prefix="tmux-test-")
    farm_dir = tmp_path / "farm"
    farm_dir.mkdir()
    shutil.copy(certificate[0], str(farm_dir / "cert.pem"))
    shutil.copy(certificate[1], str(farm_dir / "key.pem"))
    (farm_dir / "env").write_text(
        'WANDB_SYNC_FARM_USERNAME=%s\nWANDB_SYNC_FARM_PASSWORD="%s"\n'
        "WANDB_API_KEY=%s\n" % (USERNAME, PASSWORD, "k" * 40))
    environ = dict(stand_in.environ, TMUX_TMPDIR=sockets, TERM="xterm",
                   HOME=str(tmp_path), PYTHONPATH=REPO,
                   FARM_DIR=str(farm_dir), FARM_SESSION="farm-test",
                   FARM_COMMAND="%s -m wandb_offline_sync.farm"
                                % sys.executable)
    environ.pop("TMUX", None)       # else tmux talks to the outer server
    yield environ
    subprocess.run(["tmux", "kill-server"], env=environ, timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(sockets, ignore_errors=True)


def _script(environ, *argv):
    return subprocess.run(["bash", TMUX_SCRIPT] + list(argv), env=environ,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=90)


def _pane(environ):
    return subprocess.run(
        ["tmux", "capture-pane", "-p", "-J", "-S", "-200", "-t",
         environ["FARM_SESSION"]],
        env=environ, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        universal_newlines=True, timeout=30).stdout


def test_tmux_script_starts_and_stops_a_farm(tmux_environ, tmp_path,
                                             certificate):
    started = _script(tmux_environ, "start", "--host", "127.0.0.1",
                      "--port", "0", "--allow-root", str(tmp_path),
                      "--state-dir", str(tmp_path / "state"),
                      "--wandb-command", "%s %s" % (sys.executable,
                                                    STAND_IN))
    assert started.returncode == 0, started.stderr
    assert "attach" in started.stdout

    listening = re.compile(r"listening on https://127\.0\.0\.1:(\d+)")
    assert wait_until(lambda: listening.search(_pane(tmux_environ)), 30), \
        _pane(tmux_environ)
    port = int(listening.search(_pane(tmux_environ)).group(1))
    assert FarmClient(port, certificate[0]).status()["runs"] == []
    assert _script(tmux_environ, "status").returncode == 0
    assert _script(tmux_environ, "start").returncode == 1

    stopped = _script(tmux_environ, "stop")

    assert stopped.returncode == 0, stopped.stderr
    assert "farm stopped" in stopped.stdout
    assert _script(tmux_environ, "status").returncode == 1
