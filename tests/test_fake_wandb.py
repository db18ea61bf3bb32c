"""The fake W&B server, proved against the real wandb CLI.

A real offline run is made once per module by a training subprocess; each
test syncs its own copy with the real ``wandb`` command.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest

from fake_wandb import (
    API_KEY, FAST_FAILURE, FakeWandbServer, isolated_environ, unwrap_config)

STEPS = 20
CLI_TIMEOUT = 120

TRAIN_SCRIPT = textwrap.dedent("""\
    import sys
    import wandb
    run = wandb.init(project="p", mode="offline", dir=sys.argv[1],
                     config={"lr": 0.1})
    for i in range(%d):
        run.log({"loss": 1.0 / (i + 1)})
    run.summary["best"] = 1
    run.finish()
    """ % STEPS)

def run_checked(argv, environ, cwd):
    """Run argv; fail the test with the output tail if it exits non-zero."""
    done = subprocess.run(argv, env=environ, cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT)
    assert done.returncode == 0, (
        "%s exited %d:\n%s" % (argv[:3], done.returncode, done.stderr[-3000:])
    )
    return done


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The run directory of a finished offline run with STEPS steps."""
    root = str(tmp_path_factory.mktemp("training"))
    environ = isolated_environ(root)
    run_checked([sys.executable, "-c", TRAIN_SCRIPT, environ["WANDB_DIR"]],
                environ, cwd=root)
    (run_dir,) = glob.glob(
        os.path.join(environ["WANDB_DIR"], "wandb", "offline-run-*"))
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run, never synced before."""
    copy = tmp_path / "wandb" / os.path.basename(finished_run)
    shutil.copytree(finished_run, str(copy))
    return str(copy)


@pytest.fixture
def fake():
    with FakeWandbServer() as server:
        yield server


def wandb_cli(args, fake, tmp_path):
    """Run the real wandb CLI against the fake; return CompletedProcess."""
    environ = isolated_environ(str(tmp_path))
    environ.update(FAST_FAILURE, WANDB_BASE_URL=fake.url,
                   WANDB_API_KEY=API_KEY)
    cwd = tmp_path / "cwd"  # the CLI leaves ./wandb/debug*.log here
    cwd.mkdir(exist_ok=True)
    return run_checked(["wandb"] + args, environ, str(cwd))


def run_id_of(run_dir):
    return os.path.basename(run_dir).rsplit("-", 1)[1]


def assert_whole_run_arrived(fake, run_id):
    assert fake.runs() == [run_id]
    assert fake.history_steps(run_id) == list(range(STEPS))
    assert fake.history(run_id)[-1]["loss"] == pytest.approx(1.0 / STEPS)
    assert fake.config_values(run_id)["lr"] == 0.1
    assert fake.config(run_id)["lr"] == {"value": 0.1}
    assert fake.summary(run_id)["best"] == 1
    assert fake.final_state(run_id) == {"complete": True, "exitcode": 0}
    assert "config.yaml" in fake.uploads(run_id)
    assert fake.unknown_operations() == []


def test_wandb_sync_uploads_a_finished_offline_run(fake, run_copy,
                                                   tmp_path):
    done = wandb_cli(["sync", "--include-synced", run_copy], fake, tmp_path)

    assert "wandb: ERROR" not in done.stderr
    assert_whole_run_arrived(fake, run_id_of(run_copy))
    assert fake.history_offsets(run_id_of(run_copy)) == [0]
    assert os.path.exists(
        os.path.join(run_copy, "run-%s.wandb.synced" % run_id_of(run_copy)))


def test_beta_sync_live_uploads_a_finished_run_and_exits(fake, run_copy,
                                                         tmp_path):
    # `beta sync` skips runs with a .synced marker unless told not to.
    done = wandb_cli(["beta", "sync", "--live", "--no-skip-synced",
                      run_copy], fake, tmp_path)

    assert "wandb: ERROR" not in done.stderr
    assert_whole_run_arrived(fake, run_id_of(run_copy))


def test_wandb_sync_prints_the_servers_message_on_401(fake, run_copy,
                                                      tmp_path):
    fake.set_failure(401)

    done = wandb_cli(["sync", "--include-synced", run_copy], fake, tmp_path)

    assert done.returncode == 0  # the exit code does not tell
    assert ("wandb: ERROR fake wandb: injected failure"
            in done.stderr.splitlines())
    assert fake.history(run_id_of(run_copy)) == []
    assert {status for _, _, status in fake.requests()} == {401}
    assert not glob.glob(os.path.join(run_copy, "*.synced"))


# -- the fake on its own, without the CLI --------------------------------

def post(url, body, method="POST"):
    """Send body (bytes or JSON-able); return (status, decoded answer)."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def stream(fake, run_id, offset, steps, **state):
    lines = [json.dumps({"_step": step}) for step in steps]
    body = {"files": {"wandb-history.jsonl": {"offset": offset,
                                              "content": lines}}}
    body.update(state)
    url = "%s/files/e/p/%s/file_stream" % (fake.url, run_id)
    return post(url, body)


def test_file_stream_rows_are_kept_in_arrival_order_with_duplicates(fake):
    stream(fake, "r1", 0, [0, 1])
    stream(fake, "r1", 0, [0, 1, 2], complete=True, exitcode=1)

    assert fake.runs() == ["r1"]
    assert fake.history_steps("r1") == [0, 1, 0, 1, 2]
    assert fake.history_offsets("r1") == [0, 0]
    assert fake.history_bytes("r1") == 5 * len('{"_step": 0}')
    assert fake.states("r1") == [{"complete": True, "exitcode": 1}]
    arrivals = [t for t, _ in fake.history_arrivals("r1")]
    assert arrivals == sorted(arrivals)


def test_bad_json_gets_400_and_the_server_keeps_serving(fake):
    status, answer = post(fake.url + "/graphql", b"{not json")
    assert status == 400
    assert "not JSON" in answer["errors"][0]["message"]

    status, answer = post(fake.url + "/graphql",
                          {"operationName": "Mystery", "query": "{}"})
    assert (status, answer) == (200, {"data": {}})
    assert fake.unknown_operations() == ["Mystery"]


def test_set_failure_answers_everything_until_cleared(fake):
    fake.set_failure(500)
    assert stream(fake, "r1", 0, [0])[0] == 500
    assert fake.history("r1") == []

    fake.set_failure(None)
    assert stream(fake, "r1", 0, [0])[0] == 200
    assert fake.history_steps("r1") == [0]


def test_wait_for_wakes_on_arrival_and_times_out_otherwise(fake):
    assert not fake.wait_for(lambda f: f.runs(), timeout=0.05)
    stream(fake, "r1", 0, [0])
    assert fake.wait_for(lambda f: f.history_steps("r1") == [0], timeout=5)


def test_stop_closes_the_port():
    fake = FakeWandbServer().start()
    port = int(fake.url.rsplit(":", 1)[1])
    fake.stop()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_unwrap_config_drops_wandb_internals():
    config = {"lr": {"value": 0.1}, "_wandb": {"cli_version": "0.31.0"}}
    assert unwrap_config(config) == {"lr": 0.1}
