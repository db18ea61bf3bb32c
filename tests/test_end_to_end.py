"""End to end: a real training job, the real agent, a real farm running the
real wandb CLI, and the fake W&B server of the test suite."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from wandb_offline_sync import protocol

from conftest import PASSWORD, USERNAME, wait_until
from fake_wandb import API_KEY, FAST_FAILURE, FakeWandbServer, \
    isolated_environ

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WANDB = os.path.join(os.path.dirname(sys.executable), "wandb")

# Logs a step every 50 ms, for `seconds` or until SIGTERM.  Prints each
# step after wandb.log returns, so the test knows what was logged.
TRAIN = textwrap.dedent("""
    import sys, time
    import wandb
    from wandb_offline_sync import agent

    seconds = float(sys.argv[1])
    run = wandb.init(project="e2e", config={"lr": 0.01, "layers": 3})
    agent.init(frequency=1.5)
    step = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        wandb.log({"loss": 1.0 / (step + 1), "step_seen": step})
        agent.trigger_sync()
        print("logged", step, flush=True)
        step += 1
        time.sleep(0.05)
    run.summary["best_loss"] = 1.0 / step
    run.finish()
    print("finished", flush=True)
""")


@pytest.fixture
def fake():
    with FakeWandbServer() as server:
        yield server


def real_farm(start_farm, fake, tmp_path, live=False, **settings):
    """A farm running the real wandb CLI against ``fake``, with short
    backoffs and quick supervision for tests; returns (farm, client)."""
    environ = isolated_environ(str(tmp_path / "farm-env"))
    del environ["WANDB_MODE"]
    environ.update(FAST_FAILURE, WANDB_BASE_URL=fake.url,
                   WANDB_API_KEY=API_KEY)
    settings.setdefault("backoff_base", 0.5)
    settings.setdefault("backoff_cap", 2.0)
    settings.setdefault("tick", 0.2)
    settings.setdefault("watch_interval", 0.5)
    settings.setdefault("live_group_wait", 0.5)
    return start_farm([WANDB], environ=environ, timeout=120, num_threads=2,
                      live=live, live_interval=1.0,
                      scheduler_settings=settings)


@pytest.fixture
def live_farm(start_farm, fake, tmp_path):
    """A farm in periodic mode (the name is kept for other test groups:
    it syncs while the job runs)."""
    return real_farm(start_farm, fake, tmp_path)


def job_environ(farm, tmp_path):
    """The environment of a training job that reaches ``farm``."""
    environ = isolated_environ(str(tmp_path / "job"))
    environ.update({
        "PYTHONPATH": REPO,
        "WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL": "1",
        protocol.ENV_HOST: "127.0.0.1",
        protocol.ENV_PORT: str(farm[0].port),
        protocol.ENV_USERNAME: USERNAME,
        protocol.ENV_PASSWORD: PASSWORD,
        protocol.ENV_CERT: farm[1].cert,
    })
    return environ


def _job(farm, tmp_path, seconds):
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(seconds)],
        env=job_environ(farm, tmp_path),
        cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)


def _read_steps(job, until=None):
    """Read the job's stdout; return the logged steps and whether it
    finished, stopping early when ``until(steps)`` is true."""
    steps = []
    for line in job.stdout:
        words = line.split()
        if words[:1] == [b"logged"]:
            steps.append(int(words[1]))
            if until is not None and until(steps):
                return steps
    return steps


def _run_id(fake):
    runs = fake.runs()
    assert len(runs) == 1, runs
    return runs[0]


def test_run_appears_while_it_runs_and_ends_complete(live_farm, fake,
                                                     tmp_path):
    job = _job(live_farm, tmp_path, seconds=10)
    seen_while_running = False
    try:
        deadline = time.monotonic() + 90
        while job.poll() is None and time.monotonic() < deadline:
            if fake.runs() and fake.history(fake.runs()[0]):
                seen_while_running = True
            time.sleep(0.2)
        logged = _read_steps(job)
        code = job.wait(90)
        stderr = job.stderr.read().decode()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert code == 0, stderr
    assert seen_while_running, "no row reached W&B before the job ended"

    run_id = _run_id(fake)
    assert fake.wait_for(
        lambda f: f.final_state(run_id) == {"complete": True,
                                            "exitcode": 0}, 60)
    assert set(fake.history_steps(run_id)) == set(logged)
    assert len(logged) > 50
    assert fake.config_values(run_id)["lr"] == 0.01
    assert fake.config_values(run_id)["layers"] == 3
    assert fake.summary(run_id)["best_loss"] == pytest.approx(
        1.0 / len(logged))
    record = live_farm[1].status()["runs"][0]
    assert record["final_requested"]
    assert record["run_url"].endswith("/e2e/runs/" + run_id)
    assert wait_until(
        lambda: live_farm[1].status()["runs"][0]["state"] == "done", 30)


def test_sigterm_ends_the_run_with_its_exit_code(live_farm, fake,
                                                 tmp_path):
    job = _job(live_farm, tmp_path, seconds=120)
    try:
        logged = _read_steps(job, until=lambda steps: len(steps) >= 40)
        job.send_signal(signal.SIGTERM)
        code = job.wait(60)
        logged += _read_steps(job)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert code == 128 + signal.SIGTERM

    run_id = _run_id(fake)
    assert fake.wait_for(
        lambda f: f.final_state(run_id) == {"complete": True,
                                            "exitcode": 143}, 60)
    assert set(logged) <= set(fake.history_steps(run_id))


def test_example_training_script_syncs(live_farm, fake, tmp_path):
    script = os.path.join(REPO, "examples", "train.py")
    done = subprocess.run(
        [sys.executable, script, "--steps", "40", "--sleep", "0.05",
         "--frequency", "1", "--project", "example"],
        env=job_environ(live_farm, tmp_path), cwd=str(tmp_path),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    run_id = _run_id(fake)
    assert fake.wait_for(
        lambda f: f.final_state(run_id) == {"complete": True,
                                            "exitcode": 0}, 60)
    assert set(fake.history_steps(run_id)) == set(range(40))
    assert "final_loss" in fake.summary(run_id)


# Two runs one after the other in one process, as sweeps and multi-run
# jobs do; the agent is set up once.  Each run lasts a few seconds: the
# agent looks for a new run once per poll interval.
TWO_RUNS = textwrap.dedent("""
    import time
    import wandb
    from wandb_offline_sync import agent

    for number in range(2):
        run = wandb.init(project="sweep", config={"number": number})
        if number == 0:
            agent.init(frequency=1)
        for step in range(20):
            wandb.log({"loss": 1.0 / (step + 1)})
            time.sleep(0.1)
        run.finish()
""")


def test_a_second_run_in_the_same_process_is_followed(live_farm, fake,
                                                      tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", TWO_RUNS],
        env=job_environ(live_farm, tmp_path), cwd=str(tmp_path),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    assert fake.wait_for(lambda f: len(f.runs()) == 2, 60)
    for run_id in fake.runs():
        assert fake.wait_for(
            lambda f: f.final_state(run_id) == {"complete": True,
                                                "exitcode": 0}, 60)
        assert fake.history_steps(run_id) and \
            set(fake.history_steps(run_id)) == set(range(20))
    numbers = sorted(fake.config_values(r)["number"] for r in fake.runs())
    assert numbers == [0, 1]
