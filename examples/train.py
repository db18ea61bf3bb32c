#!/usr/bin/env python3
"""A small training job whose offline W&B run grows while it trains.

It logs a made-up loss (no framework needed) and uses the agent as a real
training script would: ``wandb.init`` in offline mode, ``agent.init``
right after it, ``agent.trigger_sync()`` after each log (optional: the
agent also notices new data by itself), and ``run.finish()`` at the end,
after which the agent sends the final sync request.  When Slurm's time
limit sends SIGTERM, the agent finishes the run and sends the final
request before the job exits.

    python train.py --steps 200 --sleep 0.5 --frequency 60

Defaults come from TRAIN_STEPS, TRAIN_SLEEP and SYNC_FREQUENCY; where the
farm is comes from the WANDB_SYNC_FARM_* variables (see slurm_job.sh).
"""

import argparse
import math
import os
import random
import time

import wandb

from wandb_offline_sync import agent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Log a fake loss to an offline W&B run and keep the "
                    "run in sync through a wandb_sync_farm.")
    parser.add_argument(
        "--steps", type=int, default=int(os.environ.get("TRAIN_STEPS", 1000)),
        help="training steps (default: $TRAIN_STEPS or 1000)")
    parser.add_argument(
        "--sleep", type=float,
        default=float(os.environ.get("TRAIN_SLEEP", 1.0)),
        help="seconds each step takes (default: $TRAIN_SLEEP or 1)")
    parser.add_argument(
        "--frequency", type=float,
        default=float(os.environ.get("SYNC_FREQUENCY", 300)),
        help="least seconds between two syncs (default: $SYNC_FREQUENCY "
             "or 300)")
    parser.add_argument(
        "--project", default=os.environ.get("WANDB_PROJECT",
                                            "wandb-offline-sync-example"),
        help="W&B project (default: $WANDB_PROJECT or %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Offline unless WANDB_MODE says otherwise: the compute node has no
    # internet, the farm uploads the run.
    run = wandb.init(project=args.project,
                     mode=os.environ.get("WANDB_MODE") or "offline",
                     config={"steps": args.steps, "learning_rate": 0.01})
    agent.init(frequency=args.frequency)

    rng = random.Random(0)
    loss = float("nan")
    for step in range(args.steps):
        loss = math.exp(-3.0 * step / max(1, args.steps)) \
            + 0.05 * rng.random()
        run.log({"loss": loss, "epoch": step / 100.0}, step=step)
        agent.trigger_sync()
        time.sleep(args.sleep)

    run.summary["final_loss"] = loss
    run.finish()


if __name__ == "__main__":
    main()
