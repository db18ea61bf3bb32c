"""Live mode end to end: the real wandb CLI's live sync, supervised by a
real farm, for a real training job, against the fake W&B server."""

import os
import signal
import time

import pytest

from conftest import wait_until
from fake_wandb import FakeWandbServer
from test_end_to_end import _job, _read_steps, _run_id, real_farm


@pytest.fixture
def fake():
    with FakeWandbServer() as server:
        yield server


def _states_before(fake, run_id, moment):
    return [state for when, state in fake.state_arrivals(run_id)
            if when < moment]


def test_live_run_streams_each_row_once_and_ends_clean(start_farm, fake,
                                                       tmp_path):
    farm, client = real_farm(start_farm, fake, tmp_path, live=True)
    job = _job((farm, client), tmp_path, seconds=10)
    seen_while_running = False
    try:
        deadline = time.monotonic() + 90
        while job.poll() is None and time.monotonic() < deadline:
            runs = fake.runs()
            if runs and fake.history(runs[0]):
                seen_while_running = True
            time.sleep(0.2)
        ended = time.time()
        logged = _read_steps(job)
        code = job.wait(60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert code == 0
    assert seen_while_running

    run_id = _run_id(fake)
    assert fake.wait_for(
        lambda f: f.final_state(run_id) == {"complete": True,
                                            "exitcode": 0}, 60)
    steps = fake.history_steps(run_id)
    assert sorted(steps) == sorted(set(logged)), "each row exactly once"
    offsets = fake.history_offsets(run_id)
    assert offsets == sorted(set(offsets)), "no offset sent twice"
    assert not any(state.get("complete")
                   for state in _states_before(fake, run_id, ended - 1)), \
        "the run was reported as ended while it ran"
    record = client.status()["runs"][0]
    assert record["mode"] == "live"
    assert wait_until(lambda: client.status()["runs"][0]["state"] == "done",
                      30)


def _live_pids(client):
    record = client.status()["runs"][0]
    return record["live"]["pid"] if record["live"] else None


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_job_is_finished_as_crashed_within_the_quiet_time(
        start_farm, fake, tmp_path):
    farm, client = real_farm(start_farm, fake, tmp_path, live=True,
                             stale_after=4.0)
    job = _job((farm, client), tmp_path, seconds=120)
    try:
        _read_steps(job, until=lambda steps: len(steps) >= 40)
        assert wait_until(lambda: fake.runs() and
                          fake.history(fake.runs()[0]), 30)
        pid = _live_pids(client)
        assert pid
        job.send_signal(signal.SIGKILL)
        job.wait(10)
        killed = time.monotonic()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

    run_id = _run_id(fake)
    assert wait_until(lambda: client.status()["runs"][0]["state"] == "done",
                      60)
    took = time.monotonic() - killed
    assert fake.final_state(run_id)["complete"]
    assert fake.final_state(run_id)["exitcode"] != 0
    assert client.status()["runs"][0]["went_quiet"]
    assert not _group_alive(pid)
    # Quiet time, then the live sync's stop and one ordinary sync.
    assert took < 4.0 + 30


def test_live_sync_killed_from_outside_is_restarted(start_farm, fake,
                                                    tmp_path):
    farm, client = real_farm(start_farm, fake, tmp_path, live=True)
    job = _job((farm, client), tmp_path, seconds=12)
    try:
        logged = _read_steps(job, until=lambda steps: len(steps) >= 30)
        assert wait_until(lambda: _live_pids(client), 30)
        first = _live_pids(client)
        os.killpg(first, signal.SIGKILL)
        assert wait_until(lambda: _live_pids(client) not in (None, first),
                          30)
        logged += _read_steps(job)
        assert job.wait(60) == 0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

    run_id = _run_id(fake)
    assert fake.wait_for(
        lambda f: f.final_state(run_id) == {"complete": True,
                                            "exitcode": 0}, 60)
    assert set(logged) <= set(fake.history_steps(run_id))
    assert client.status()["runs"][0]["live"]["restarts"] >= 1
