"""The frameworks group: real Lightning and Transformers trainings whose
agent is started by a callback, synced through a real farm.

Every test here carries the ``frameworks`` marker.  Without the
frameworks installed (``pip install -e '.[frameworks]'``, with torch
pinned as the README says) the tests are skipped, unless the group is
asked for by ``-m frameworks``: then they fail and say what is missing.

The farm and the fake W&B server are the end-to-end test's fixtures.
"""

import importlib.util
import subprocess
import sys

import pytest

from test_end_to_end import fake, job_environ, live_farm  # noqa: F401

MARKER = "frameworks"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "%s: real Lightning and Transformers trainings "
        "(needs the frameworks extra)" % MARKER)


@pytest.fixture(autouse=True)
def required_frameworks(request):
    """Skip a test unless the modules its module lists in ``REQUIRES``
    can be imported; fail instead when the group was asked for by name.

    Autouse fixtures come first, so no farm starts for a skipped test.
    """
    modules = getattr(request.module, "REQUIRES", ())
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    message = ("%s not installed; pip install -e '.[frameworks]' "
               "torch==2.13.0" % ", ".join(missing))
    if request.config.getoption("markexpr", "").strip() == MARKER:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def run_job(farm, tmp_path, script, *args, timeout=300):
    """Run a training script as a job that reaches ``farm``; return
    (exit code, stdout, stderr), both as text."""
    environ = job_environ(farm, tmp_path)
    environ.update({
        # No downloads: models are built from configs in the script.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    done = subprocess.run(
        [sys.executable, "-c", script] + [str(a) for a in args],
        env=environ, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return (done.returncode, done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"))


def printed(stdout, word):
    """The words after ``word`` on the line the job printed with it."""
    for line in stdout.splitlines():
        words = line.split()
        if words[:1] == [word]:
            return words[1:]
    raise AssertionError("the job printed no %r line:\n%s" % (word, stdout))


def farm_record(farm, run_id):
    """The farm's status record of the run ``run_id``."""
    records = [r for r in farm[1].status()["runs"] if r["run_id"] == run_id]
    assert len(records) == 1, records
    return records[0]
