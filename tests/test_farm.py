"""The farm over real HTTPS: routes, auth, request checks, syncing."""

import os
import socket
import ssl
import time

from wandb_offline_sync import protocol

from conftest import USERNAME, make_run_dir, wait_until


def test_json_request_is_accepted_and_synced(start_farm, stand_in,
                                             tmp_path):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "r1")

    status, _, state = client.sync(run_dir, run_id="r1")

    assert status == 202
    assert state["run_id"] == "r1"
    assert state["run_dir"] == run_dir
    assert state["state"] in ("queued", "syncing")
    assert wait_until(lambda: client.run(run_dir)["state"] == "idle", 10)
    assert stand_in.calls()[0]["argv"][-1] == run_dir


def test_form_request_of_old_agents_is_accepted(start_farm, stand_in,
                                                tmp_path):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "r2")
    body = ("run_id=r2&run_dir=%s" % run_dir).encode()

    status, _, state = client.request(
        "POST", "/sync", body,
        {"Content-Type": "application/x-www-form-urlencoded"})

    assert status == 202
    assert state["run_dir"] == run_dir


def test_files_folder_and_wandb_file_mean_the_run_directory(
        start_farm, stand_in, tmp_path):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "r3")

    for given in (os.path.join(run_dir, "files"),
                  os.path.join(run_dir, "run-r3.wandb")):
        status, _, state = client.sync(given)
        assert status == 202
        assert state["run_dir"] == run_dir
        assert state["run_id"] == "r3"


def test_status_lists_runs_with_their_last_attempt(start_farm, stand_in,
                                                   tmp_path):
    stand_in.behave(mode="error", line="wandb: ERROR upload failed")
    farm, client = start_farm(
        stand_in.command, environ=stand_in.environ,
        scheduler_settings={"backoff_base": 30})
    run_dir = make_run_dir(tmp_path, "r4")
    client.sync(run_dir, final=True)

    assert wait_until(lambda: client.run(run_dir)["attempts"] >= 1, 10)
    record = client.run(run_dir)
    assert record["state"] == "retry_wait"
    assert record["final_requested"] is True
    assert record["next_retry"] > time.time() + 20
    last = record["last_attempt"]
    assert last["outcome"] == "transient"
    assert "wandb: ERROR upload failed" in last["stderr_tail"]
    assert last["started"] <= last["ended"]
    assert client.status()["farm"]["version"]


def test_many_requests_during_one_slow_sync_give_one_follow_up(
        start_farm, stand_in, tmp_path):
    stand_in.behave(mode="slow", seconds=2.0)
    farm, client = start_farm(stand_in.command, environ=stand_in.environ,
                              num_threads=4)
    run_dir = make_run_dir(tmp_path, "r5")
    client.sync(run_dir)
    assert wait_until(lambda: stand_in.calls(), 10)

    for _ in range(20):
        assert client.sync(run_dir)[0] == 202

    assert wait_until(lambda: len(stand_in.calls("end")) == 2, 15)
    time.sleep(0.5)
    assert len(stand_in.calls()) == 2
    assert client.run(run_dir)["state"] == "idle"


def test_hanging_sync_is_killed_at_the_timeout_and_retried(
        start_farm, stand_in, tmp_path):
    stand_in.behave(sequence=[{"mode": "hang"}, {"mode": "ok"}])
    farm, client = start_farm(stand_in.command, environ=stand_in.environ,
                              timeout=1.5,
                              scheduler_settings={"backoff_base": 0.2})
    farm.cli.kill_grace = 0.3
    run_dir = make_run_dir(tmp_path, "r6")

    client.sync(run_dir, final=True)

    assert wait_until(lambda: client.run(run_dir)["state"] == "done", 15)
    record = client.run(run_dir)
    assert record["attempts"] == 2
    assert len(stand_in.calls()) == 2
    for pid in stand_in.pids():
        assert not os.path.exists("/proc/%d/cmdline" % pid) or \
            _is_zombie(pid)


def _is_zombie(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_missing_credentials_get_401_with_a_challenge(start_farm, stand_in,
                                                      tmp_path):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    for auth in (None, (USERNAME, "wrong"), ("", "")):
        status, headers, body = client.request("GET", "/status", auth=auth)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Basic ")
        assert body["error"]


def test_unknown_paths_and_methods(start_farm, stand_in):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    assert client.request("GET", "/nope")[0] == 404
    status, headers, body = client.request("DELETE", "/sync")
    assert status == 405
    assert headers["Allow"] == "POST"
    assert client.request("GET", "/sync")[0] == 405
    assert client.request("BREW", "/status")[0] == 405
    assert client.request("POST", "/status", b"{}")[0] == 405


def test_bad_bodies_get_400_with_a_reason(start_farm, stand_in, tmp_path):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "r7")
    cases = [
        b"{not json",
        b"[1, 2]",
        b'{"run_dir": 5}',
        b'{"run_dir": "relative/path"}',
        b'{"run_id": "x"}',
        ('{"run_dir": "%s", "final": "maybe"}' % run_dir).encode(),
        ('{"run_dir": "%s", "run_id": "../x"}' % run_dir).encode(),
    ]
    for body in cases:
        status, _, answer = client.request(
            "POST", "/sync", body, {"Content-Type": "application/json"})
        assert status == 400, body
        assert answer["error"], body
    assert stand_in.calls() == []


def test_missing_run_directory_gets_404(start_farm, stand_in, tmp_path):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    status, _, answer = client.sync(str(tmp_path / "wandb" / "nothing"))
    assert status == 404
    assert "does not exist" in answer["error"]


def test_oversized_body_gets_413(start_farm, stand_in):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    body = b'{"run_dir": "/' + b"x" * (protocol.MAX_BODY_BYTES * 4) + b'"}'
    status, _, answer = client.request(
        "POST", "/sync", body, {"Content-Type": "application/json"})
    assert status == 413


def test_plain_http_on_the_tls_port_does_not_disturb_the_farm(
        start_farm, stand_in, tmp_path):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    with socket.create_connection(("127.0.0.1", farm.port), 5) as plain:
        plain.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        plain.settimeout(5)
        try:
            plain.recv(100)
        except (ConnectionError, socket.timeout):
            pass
    assert client.request("GET", "/status")[0] == 200


def test_farm_refuses_tls_older_than_1_2(start_farm, stand_in):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.minimum_version = ssl.TLSVersion.TLSv1
    except ValueError:
        return      # this OpenSSL cannot even offer old TLS
    with socket.create_connection(("127.0.0.1", farm.port), 5) as raw:
        try:
            with context.wrap_socket(raw):
                handshake_ok = True
        except (ssl.SSLError, OSError):
            handshake_ok = False
    assert not handshake_ok


def test_status_page_is_served_to_a_logged_in_person(start_farm, stand_in,
                                                     tmp_path):
    farm, client = start_farm(stand_in.command, environ=stand_in.environ)
    run_dir = make_run_dir(tmp_path, "page1")
    client.sync(run_dir)

    status, headers, body = client.request("GET", "/")

    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"page1" in body
    assert client.request("GET", "/", auth=None)[0] == 401
