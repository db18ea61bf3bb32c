"""Faults: the farm killed and restarted, W&B down, a lost final request,
a sync that fails for good."""

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from wandb_offline_sync import protocol
from wandb_offline_sync.state import StateStore

from conftest import (
    PASSWORD, USERNAME, FarmClient, make_run_dir, wait_until)
from fake_wandb import FakeWandbServer
from test_end_to_end import _job, _read_steps, _run_id, real_farm
from test_farm_cli import _argv, _env, _listening_port


def _start_cli_farm(tmp_path, stand_in, certificate):
    env = _env(tmp_path, stand_in.folder,
               **{protocol.ENV_USERNAME: USERNAME,
                  protocol.ENV_PASSWORD: PASSWORD})
    farm = subprocess.Popen(_argv(tmp_path, *certificate), env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    port, _ = _listening_port(farm)
    # Keep reading its log so it never blocks on a full pipe.
    threading.Thread(target=farm.stderr.read, daemon=True).start()
    return farm, FarmClient(port, certificate[0])


def test_farm_killed_during_a_final_sync_finishes_it_after_restart(
        tmp_path, stand_in, certificate):
    stand_in.behave(sequence=[{"mode": "slow", "seconds": 60},
                              {"mode": "ok"}])
    run_dir = make_run_dir(tmp_path, "k1")
    farm, client = _start_cli_farm(tmp_path, stand_in, certificate)
    try:
        assert client.sync(run_dir, final=True)[0] == 202
        assert wait_until(lambda: stand_in.calls(), 15)
        farm.send_signal(signal.SIGKILL)
        farm.wait(10)
    finally:
        if farm.poll() is None:
            farm.kill()
            farm.wait()
    first_pid = stand_in.calls()[0]["pid"]
    saved = StateStore(str(tmp_path / "state")).load()
    assert saved[0]["final_requested"]

    farm, client = _start_cli_farm(tmp_path, stand_in, certificate)
    try:
        assert wait_until(
            lambda: (client.run(run_dir) or {}).get("state") == "done", 30)
        # The old farm's sync was ended, not left running beside the new.
        assert wait_until(lambda: not os.path.exists(
            "/proc/%d/cmdline" % first_pid) or _zombie(first_pid), 10)
        farm.send_signal(signal.SIGTERM)
        assert farm.wait(30) == 0
    finally:
        if farm.poll() is None:
            farm.kill()
            farm.wait()
    assert len(stand_in.calls()) == 2
    assert len(stand_in.calls("end")) == 1


def _zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_permanent_failure_stops_retries_and_status_says_why(
        start_farm, stand_in, tmp_path):
    stand_in.behave(mode="error",
                    line="Error: No API key configured. Use `wandb login`")
    farm, client = start_farm(stand_in.command, environ=stand_in.environ,
                              scheduler_settings={"backoff_base": 0.1})
    run_dir = make_run_dir(tmp_path, "p1")
    client.sync(run_dir, final=True)
    assert wait_until(lambda: client.run(run_dir)["state"] == "failed", 10)
    time.sleep(0.5)
    record = client.run(run_dir)
    assert record["attempts"] == 1
    assert record["last_attempt"]["outcome"] == "permanent"
    assert "API key" in record["last_attempt"]["reason"]
    assert len(stand_in.calls()) == 1


@pytest.fixture
def fake():
    with FakeWandbServer() as server:
        yield server


def test_wandb_down_for_a_while_the_run_still_ends_complete(
        start_farm, fake, tmp_path):
    farm, client = real_farm(start_farm, fake, tmp_path, live=True)
    job = _job((farm, client), tmp_path, seconds=14)
    try:
        logged = _read_steps(job, until=lambda steps: len(steps) >= 40)
        assert wait_until(lambda: fake.runs() and
                          fake.history(fake.runs()[0]), 30)
        fake.set_failure(503)
        logged += _read_steps(job, until=lambda steps: len(steps) >= 120)
        fake.set_failure(None)
        logged += _read_steps(job)
        assert job.wait(60) == 0
    finally:
        fake.set_failure(None)
        if job.poll() is None:
            job.kill()
            job.wait()
    run_id = _run_id(fake)
    assert wait_until(lambda: client.status()["runs"][0]["state"] == "done",
                      90)
    assert fake.final_state(run_id) == {"complete": True, "exitcode": 0}
    assert set(logged) <= set(fake.history_steps(run_id))


class _Relay:
    """Forwards TCP from a local port to the farm until cut."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            upstream = socket.create_connection(self.target, 5)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b),
                                 daemon=True).start()
        self.listener.close()

    def _pipe(self, source, sink):
        try:
            while not self.cut.is_set():
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass


@pytest.mark.parametrize("live", [True, False], ids=["live", "periodic"])
def test_lost_final_request_the_farm_still_finishes_the_run(
        start_farm, fake, tmp_path, live):
    farm, client = real_farm(start_farm, fake, tmp_path, live=live,
                             stale_after=4.0)
    relay = _Relay(farm.port)

    class _ViaRelay:
        cert = client.cert

    job = _job((_Port(relay.port), _ViaRelay), tmp_path, seconds=6)
    try:
        logged = _read_steps(job, until=lambda steps: len(steps) >= 30)
        assert wait_until(lambda: client.status()["runs"], 30)
        relay.cut.set()
        logged += _read_steps(job)
        assert job.wait(60) == 0
    finally:
        relay.cut.set()
        if job.poll() is None:
            job.kill()
            job.wait()
    record = client.status()["runs"][0]
    assert not record["final_requested"], "the final request was lost"
    assert wait_until(lambda: client.status()["runs"][0]["state"] == "done",
                      60)
    run_id = _run_id(fake)
    # A live sync ends by itself with the run; a periodic farm finishes
    # the run once the job has gone quiet.
    assert client.status()["runs"][0]["went_quiet"] is not live
    # The job ended cleanly, so its log holds the exit record.
    assert fake.final_state(run_id) == {"complete": True, "exitcode": 0}
    assert set(logged) <= set(fake.history_steps(run_id))


class _Port:
    def __init__(self, port):
        self.port = port
