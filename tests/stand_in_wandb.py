"""A stand-in for the wandb CLI whose behaviour a test scripts.

Only for failures the real CLI cannot be made to produce on demand: a
hang, a given exit code, a given ERROR line, a slow sync.  The test writes
``behaviour.json`` into ``$STAND_IN_DIR``; each call appends a line to
``calls.jsonl`` there when it starts and another when it ends, and a hang
records the pids of the processes it leaves running in ``pids.txt``.

behaviour.json: {"mode": "ok" | "hang" | "error" | "exit" | "slow",
                 "seconds": float, "code": int, "line": str}
or {"sequence": [behaviour, ...]} to script call after call (the last
one repeats).
"""

import json
import os
import subprocess
import sys
import time


def _behaviour(folder, index):
    try:
        with open(os.path.join(folder, "behaviour.json")) as f:
            spec = json.load(f)
    except FileNotFoundError:
        return {"mode": "ok"}
    sequence = spec.get("sequence")
    if sequence:
        return sequence[min(index, len(sequence) - 1)]
    return spec


def _record(folder, **fields):
    fields["pid"] = os.getpid()
    fields["time"] = time.time()
    with open(os.path.join(folder, "calls.jsonl"), "a") as f:
        f.write(json.dumps(fields) + "\n")


def main(argv):
    if argv[:1] == ["--version"]:
        print("wandb, version 0.0.0 (stand-in)")
        return 0
    if "--help" in argv:
        print("Usage: wandb %s [OPTIONS]  (stand-in: offers no live sync)"
              % " ".join(argv[:-1]))
        return 0
    folder = os.environ["STAND_IN_DIR"]
    try:
        with open(os.path.join(folder, "calls.jsonl")) as f:
            index = sum(1 for line in f if '"start"' in line)
    except FileNotFoundError:
        index = 0
    spec = _behaviour(folder, index)
    mode = spec.get("mode", "ok")
    _record(folder, event="start", argv=argv, mode=mode)

    if mode == "hang":
        child = subprocess.Popen([sys.executable, "-c",
                                  "import time; time.sleep(600)"])
        with open(os.path.join(folder, "pids.txt"), "a") as f:
            f.write("%d\n%d\n" % (os.getpid(), child.pid))
        time.sleep(600)
    elif mode == "slow":
        time.sleep(spec.get("seconds", 1.0))
    elif mode == "error":
        print(spec.get("line", "wandb: ERROR something went wrong"),
              file=sys.stderr)
    elif mode == "exit":
        print("wandb: failing on purpose", file=sys.stderr)
        _record(folder, event="end")
        return spec.get("code", 1)

    print("Syncing: %s ... done." % argv[-1])
    _record(folder, event="end")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
