"""The package imports with the standard library alone, on Python 3.8+."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "wandb_offline_sync")
CHECKER = os.path.join(os.path.dirname(REPO), "shared", "tools",
                       "check_stdlib_only.py")


def test_modules_import_nothing_outside_the_standard_library():
    assert os.path.isfile(CHECKER), "the shared checker is missing"
    done = subprocess.run([sys.executable, CHECKER, PACKAGE],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == b"", done.stdout


def test_every_module_imports_without_wandb_in_an_isolated_python(
        tmp_path):
    # -I: no site-packages, no user site, no PYTHONPATH; only the package.
    names = sorted(n[:-3] for n in os.listdir(PACKAGE)
                   if n.endswith(".py") and n != "__init__.py")
    code = ("import sys; sys.path.insert(0, %r)\n" % REPO +
            "".join("import wandb_offline_sync.%s\n" % n for n in names) +
            "assert 'wandb' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-I", "-c", code],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=60, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout.decode()


def _vermin():
    beside = os.path.join(os.path.dirname(sys.executable), "vermin")
    return beside if os.path.exists(beside) else shutil.which("vermin")


def test_package_code_needs_nothing_newer_than_python_3_8():
    assert _vermin(), "vermin is part of the test extra"
    done = subprocess.run(
        [_vermin(), "--target=3.8-", "--violations", "--no-tips",
         "--eval-annotations", PACKAGE],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert done.returncode == 0, done.stdout.decode()


def _python_3_8():
    candidates = sorted(glob.glob(os.path.expanduser(
        "~/.pyenv/versions/3.8*/bin/python3.8")))
    candidates += [p for p in [shutil.which("python3.8")] if p]
    for path in candidates:
        try:
            done = subprocess.run([path, "-c", "pass"], timeout=30,
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        except OSError:
            continue
        if done.returncode == 0:
            return path
    return None


@pytest.mark.skipif(_python_3_8() is None,
                    reason="no Python 3.8 on this machine; vermin checks")
def test_every_module_imports_on_a_real_python_3_8(tmp_path):
    names = sorted(n[:-3] for n in os.listdir(PACKAGE)
                   if n.endswith(".py"))
    code = ("import sys; sys.path.insert(0, %r)\n" % REPO +
            "".join("import wandb_offline_sync.%s\n" % n for n in names))
    done = subprocess.run([_python_3_8(), "-I", "-c", code],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=60, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout.decode()
