"""The agent: requests reach the farm, and nothing hurts the job."""

import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from wandb_offline_sync import agent as agent_module
from wandb_offline_sync import protocol
from wandb_offline_sync.agent import Agent, FarmWarning

from conftest import PASSWORD, USERNAME, make_certificate, make_run_dir, \
    wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _address(port, cert, host="127.0.0.1"):
    return protocol.FarmAddress(host=host, port=port, username=USERNAME,
                                password=PASSWORD, cert=cert)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def recorded_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _farm_warnings(caught):
    return [w for w in caught if issubclass(w.category, FarmWarning)]


def test_trigger_reaches_the_farm(start_farm, stand_in, tmp_path,
                                  certificate):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "a1")
    agent = Agent(frequency=60, address=_address(farm.port, certificate[0]),
                  run_dir=run_dir, watch=False).start()
    try:
        agent.trigger()
        assert wait_until(lambda: client.run(run_dir) is not None, 10)
        agent.trigger()                 # rate limited: no second request
        time.sleep(0.5)
        assert client.run(run_dir)["requests"] == 1
    finally:
        agent.stop()


def test_growing_log_is_noticed_without_trigger(start_farm, stand_in,
                                                tmp_path, certificate):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "a2")
    agent = Agent(frequency=0.2, address=_address(farm.port, certificate[0]),
                  run_dir=run_dir)
    agent.poll_interval = 0.05
    agent.start()
    try:
        assert wait_until(lambda: client.run(run_dir) is not None, 10)
        first = client.run(run_dir)["requests"]
        time.sleep(0.6)
        assert client.run(run_dir)["requests"] == first, "log did not grow"
        with open(os.path.join(run_dir, "run-a2.wandb"), "ab") as f:
            f.write(b"x" * 100)
        assert wait_until(
            lambda: client.run(run_dir)["requests"] == first + 1, 10)
    finally:
        agent.stop()


def test_quiet_job_still_sends_heartbeats(start_farm, stand_in, tmp_path,
                                         certificate):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "a2h")
    agent = Agent(frequency=0.1, address=_address(farm.port, certificate[0]),
                  run_dir=run_dir)
    agent.poll_interval = 0.05
    agent.heartbeat_interval = 0.5
    agent.start()
    try:
        assert wait_until(lambda: client.run(run_dir) is not None, 10)
        assert wait_until(lambda: client.run(run_dir)["requests"] >= 3, 10)
    finally:
        agent.stop()


def test_farm_down_leaves_training_alone_and_warns_once(
        tmp_path, recorded_warnings, certificate):
    run_dir = make_run_dir(tmp_path, "a3")
    agent = Agent(frequency=0.0, address=_address(_free_port(),
                                                  certificate[0]),
                  run_dir=run_dir, timeout=0.5, final_timeout=0.5)
    agent.start()
    try:
        slowest = 0.0
        deadline = time.monotonic() + 2.0
        calls = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            agent.trigger()
            slowest = max(slowest, time.perf_counter() - started)
            calls += 1
            time.sleep(0.001)
        assert not agent.finish()
    finally:
        agent.stop()
    unreachable = [w for w in _farm_warnings(recorded_warnings)
                   if "cannot reach" in str(w.message)]
    assert len(unreachable) == 1
    assert calls > 100
    # A generous bound: a call that waited for the network would take
    # at least the 0.5 s request timeout.
    assert slowest < 0.25


def test_slow_farm_does_not_slow_trigger(tmp_path, certificate):
    cert, key = certificate
    hold = threading.Event()
    server = _SilentTLSServer(cert, key, hold)
    run_dir = make_run_dir(tmp_path, "a4")
    agent = Agent(frequency=0.0, address=_address(server.port, cert),
                  run_dir=run_dir, timeout=5.0, watch=False).start()
    try:
        slowest = 0.0
        for _ in range(200):
            started = time.perf_counter()
            agent.trigger()
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.005)
        assert wait_until(lambda: server.connections >= 1, 5)
    finally:
        hold.set()
        agent.stop()
        server.close()
    assert slowest < 0.25


class _SilentTLSServer:
    """Accepts TLS connections and answers nothing until told to."""

    def __init__(self, cert, key, hold):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.hold = hold
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.hold.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.connections += 1
            self.hold.wait(10)
            conn.close()

    def close(self):
        self.hold.set()
        self.thread.join(5)
        self.sock.close()


def test_pinned_certificate_is_checked(start_farm, stand_in, tmp_path,
                                       recorded_warnings):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    other_cert, _ = make_certificate(str(tmp_path))
    run_dir = make_run_dir(tmp_path, "a5")
    agent = Agent(frequency=60, address=_address(farm.port, other_cert),
                  run_dir=run_dir, final_timeout=0.5)
    agent.start()
    try:
        assert not agent.finish()
    finally:
        agent.stop()
    assert client.run(run_dir) is None
    messages = [str(w.message) for w in _farm_warnings(recorded_warnings)]
    assert any("did not show the certificate" in m for m in messages)


def test_without_a_certificate_it_warns_how_to_fix_it(
        start_farm, stand_in, tmp_path, recorded_warnings):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "a6")
    agent = Agent(frequency=60, address=_address(farm.port, None),
                  run_dir=run_dir).start()
    try:
        assert agent.finish()
    finally:
        agent.stop()
    messages = [str(w.message) for w in _farm_warnings(recorded_warnings)]
    assert len(messages) == 1
    assert protocol.ENV_CERT in messages[0]
    assert client.run(run_dir)["final_requested"]


def test_wrong_password_is_reported_once(start_farm, stand_in, tmp_path,
                                         recorded_warnings, certificate):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    address = _address(farm.port, certificate[0])
    address.password = "wrong"
    run_dir = make_run_dir(tmp_path, "a7")
    agent = Agent(frequency=0, address=address, run_dir=run_dir,
                  watch=False).start()
    try:
        for _ in range(3):
            agent.trigger()
            time.sleep(0.3)
    finally:
        agent.stop()
    messages = [str(w.message) for w in _farm_warnings(recorded_warnings)]
    assert len(messages) == 1
    assert "401" in messages[0] and protocol.ENV_PASSWORD in messages[0]
    # One wrong password costs one failed login: asking again would lock
    # this address out for the other jobs on the node.
    assert len(farm.server.throttle._failures["127.0.0.1"]) == 1


def test_trigger_sync_before_init_warns_once(recorded_warnings,
                                             monkeypatch):
    monkeypatch.setattr(agent_module, "_agent", None)
    monkeypatch.setattr(agent_module, "_warned_before_init", False)
    for _ in range(5):
        agent_module.trigger_sync()
    assert len(_farm_warnings(recorded_warnings)) == 1


_JOB = textwrap.dedent("""
    import sys, time
    from wandb_offline_sync import agent
    agent.init(frequency=1, run_dir=sys.argv[1])
    agent.trigger_sync()
    print("ready", flush=True)
    if sys.argv[2] == "wait":
        time.sleep(60)
""")


def _job_env(farm, cert):
    env = dict(os.environ)
    env.update({protocol.ENV_HOST: "127.0.0.1",
                protocol.ENV_PORT: str(farm.port),
                protocol.ENV_USERNAME: USERNAME,
                protocol.ENV_PASSWORD: PASSWORD,
                protocol.ENV_CERT: cert,
                "PYTHONPATH": REPO})
    return env


def test_final_request_is_sent_at_exit(start_farm, stand_in, tmp_path,
                                       certificate):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "a8")

    done = subprocess.run(
        [sys.executable, "-c", _JOB, run_dir, "exit"],
        env=_job_env(farm, certificate[0]), timeout=60,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    assert done.returncode == 0, done.stderr
    record = client.run(run_dir)
    assert record["final_requested"]
    assert wait_until(lambda: client.run(run_dir)["state"] == "done", 10)


def test_final_request_is_sent_on_sigterm(start_farm, stand_in, tmp_path,
                                          certificate):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "a9")
    job = subprocess.Popen(
        [sys.executable, "-c", _JOB, run_dir, "wait"],
        env=_job_env(farm, certificate[0]), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        assert job.stdout.readline().strip() == b"ready"
        started = time.monotonic()
        job.send_signal(signal.SIGTERM)
        code = job.wait(30)
        took = time.monotonic() - started
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        job.stdout.close()
        job.stderr.close()
    assert code == 128 + signal.SIGTERM
    assert took < 10
    assert client.run(run_dir)["final_requested"]


def test_final_request_at_exit_gives_up_in_bounded_time(tmp_path,
                                                        certificate):
    run_dir = make_run_dir(tmp_path, "a10")
    env = dict(os.environ, PYTHONPATH=REPO,
               **{protocol.ENV_HOST: "127.0.0.1",
                  protocol.ENV_PORT: str(_free_port()),
                  protocol.ENV_CERT: certificate[0]})
    script = _JOB.replace("frequency=1,", "frequency=1, final_timeout=2,")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, run_dir, "exit"],
                          env=env, timeout=60, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    took = time.monotonic() - started
    assert done.returncode == 0
    assert took < 15
    assert b"was not delivered" in done.stderr
    assert b"never heard of this run; sync it with `wandb sync" in \
        done.stderr
