#!/bin/bash
#SBATCH --job-name=train
#SBATCH --time=02:00:00
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --output=%x-%j.out
#
# A Slurm job whose W&B run appears on W&B while it trains.  Submit with
#     sbatch slurm_job.sh
# after starting the farm on a login node (see farm_in_tmux.sh or
# wandb_sync_farm.service).
#
# No --signal option is needed: at the time limit Slurm sends SIGTERM to
# the job, waits KillWait seconds (30 by default), then sends SIGKILL.  The
# agent catches SIGTERM, lets wandb finish the run and sends the final sync
# request well within that time.  (--signal=TERM@120 would only make the
# warning come earlier.)

set -euo pipefail

# wandb writes the run on the shared filesystem and uploads nothing.
export WANDB_MODE=offline
# Write wandb's log every second rather than every 15 s, so each sync
# finds fresh data.
export WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=1

# Where the farm runs, as its start-up log says.
export WANDB_SYNC_FARM_HOST=login1
export WANDB_SYNC_FARM_PORT=57891
# The farm's certificate (not its key): the agent trusts only it.
export WANDB_SYNC_FARM_CERT="$HOME/.wandb_sync_farm/cert.pem"
# The farm's username and password.  Rather than writing them here, keep
# them in a file only you can read (chmod 600) holding two lines:
#     export WANDB_SYNC_FARM_USERNAME=me
#     export WANDB_SYNC_FARM_PASSWORD='a long random string'
# shellcheck source=/dev/null
source "$HOME/.wandb_sync_farm/agent.env"

# How often the agent asks for a sync at most, in seconds (train.py).
export SYNC_FREQUENCY=300

# exec: Python takes the shell's place, so the SIGTERM at the time limit
# reaches the training job itself, and no shell exits early and makes
# Slurm kill the job before the final sync request is sent.
exec python train.py --steps 1000 --sleep 1
