"""One sync attempt: argv, supervision and judging the output."""

import os
import time

import pytest

from wandb_offline_sync.wandbcli import (
    NOT_READY, OK, PERMANENT, TRANSIENT, WandbCli, classify)

from conftest import make_run_dir


# Lines as wandb 0.31 prints them (see the facts file and test_fake_wandb).
@pytest.mark.parametrize("exit_code, output, expected", [
    (0, "wandb: Syncing 1 run(s):\nwandb: [p/x] Finished syncing r", OK),
    (0, 'wandb: ERROR Failed to sync all data from "r": the file ends '
        "with an incomplete record. If the run is still running, retry "
        "after it finishes", NOT_READY),
    (0, 'wandb: ERROR Failed to read "r": transactionlog: error getting '
        "next record: EOF", NOT_READY),
    (1, "wandb: ERROR Find detailed error logs at: /w/debug-cli.log\n"
        "Error: No API key configured. Use `wandb login` to log in.",
     PERMANENT),
    (1, "Error: WANDB_API_KEY invalid: API key must have 40+ characters, "
        "has 5.", PERMANENT),
    (2, "Usage: wandb sync [OPTIONS] [PATHS]...\n\nError: Invalid value "
        "for '[PATHS]...': Path '/x' does not exist.", PERMANENT),
    (0, "wandb: ERROR Error initializing run: POST http://h/graphql giving "
        "up after 2 attempt(s): Post \"http://h/graphql\": dial tcp "
        "127.0.0.1:9: connect: connection refused", TRANSIENT),
    (0, "wandb: ERROR while retrying: HTTP 500: boom", TRANSIENT),
    (0, "wandb: ERROR [p/x] Fatal error while uploading data. Some run "
        "data will not be synced", TRANSIENT),
    (0, "wandb: ERROR permission denied by the server", PERMANENT),
    (0, "wandb: ERROR something nobody has seen", TRANSIENT),
    (2, "", TRANSIENT),
    (-9, "", TRANSIENT),
])
def test_classify_reads_error_lines_not_only_the_exit_code(
        exit_code, output, expected):
    outcome, reason = classify(exit_code, output)
    assert outcome == expected
    assert reason


def test_classify_timeout_is_transient():
    assert classify(None, "", timed_out=True)[0] == TRANSIENT


def test_sync_argv_is_a_list_with_the_run_dir_as_one_argument(
        tmp_path, stand_in):
    run_dir = make_run_dir(tmp_path / "a [b] 'c' \"d\" é", "r1")
    cli = WandbCli(stand_in.command, environ=stand_in.environ,
                   work_root=str(tmp_path / "work"))

    attempt = cli.sync(run_dir)

    assert attempt.outcome == OK
    argv = stand_in.calls()[0]["argv"]
    assert argv == ["sync", "--include-synced", run_dir]


def test_online_named_directories_need_include_online(tmp_path):
    cli = WandbCli(["wandb"], work_root=str(tmp_path))
    online = make_run_dir(tmp_path, "r2", offline=False)
    offline = make_run_dir(tmp_path, "r3")
    assert "--include-online" in cli.sync_argv(online)
    assert "--include-online" not in cli.sync_argv(offline)


def test_error_line_with_exit_zero_counts_as_failed(tmp_path, stand_in):
    stand_in.behave(mode="error", line="wandb: ERROR upload failed: 500")
    cli = WandbCli(stand_in.command, environ=stand_in.environ,
                   work_root=str(tmp_path / "work"))

    attempt = cli.sync(make_run_dir(tmp_path))

    assert attempt.exit_code == 0
    assert attempt.outcome == TRANSIENT
    assert any("ERROR upload failed" in line
               for line in attempt.stderr_tail)


def test_non_zero_exit_counts_as_failed(tmp_path, stand_in):
    stand_in.behave(mode="exit", code=3)
    cli = WandbCli(stand_in.command, environ=stand_in.environ,
                   work_root=str(tmp_path / "work"))

    attempt = cli.sync(make_run_dir(tmp_path))

    assert attempt.exit_code == 3
    assert attempt.outcome == TRANSIENT
    assert "3" in attempt.reason


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_hanging_sync_is_killed_with_its_whole_group(tmp_path, stand_in):
    stand_in.behave(mode="hang")
    cli = WandbCli(stand_in.command, environ=stand_in.environ,
                   work_root=str(tmp_path / "work"), timeout=2.0)
    cli.kill_grace = 0.5

    attempt = cli.sync(make_run_dir(tmp_path))

    assert attempt.timed_out
    assert attempt.exit_code is None
    assert attempt.outcome == TRANSIENT
    pids = stand_in.pids()
    assert len(pids) == 2, "the stand-in and its child"
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_scratch_working_directory_is_removed(tmp_path, stand_in):
    work = tmp_path / "work"
    cli = WandbCli(stand_in.command, environ=stand_in.environ,
                   work_root=str(work))
    cli.sync(make_run_dir(tmp_path))
    assert list(work.iterdir()) == []


def test_missing_executable_is_a_failed_attempt(tmp_path):
    cli = WandbCli([str(tmp_path / "no-such-wandb")],
                   work_root=str(tmp_path / "work"))
    attempt = cli.sync(make_run_dir(tmp_path))
    assert attempt.outcome != OK
    assert "cannot start" in attempt.reason


def test_child_environment_drops_silencing_and_offline_mode(tmp_path):
    cli = WandbCli(["wandb"], work_root=str(tmp_path),
                   environ={"WANDB_SILENT": "true", "WANDB_MODE": "offline",
                            "WANDB_API_KEY": "k"})
    assert cli.environ["WANDB_API_KEY"] == "k"
    assert "WANDB_SILENT" not in cli.environ
    assert "WANDB_MODE" not in cli.environ
