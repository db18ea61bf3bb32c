#!/bin/bash
# Keep the farm running in a detached tmux session on a login node.
#
#   farm_in_tmux.sh start [FARM OPTIONS]   start the farm in the background
#   farm_in_tmux.sh attach                 watch its log; leave with Ctrl-b d
#   farm_in_tmux.sh status                 say whether the session is there
#   farm_in_tmux.sh stop                   Ctrl-C: it ends its syncs, exits
#
# For example:
#   farm_in_tmux.sh start --allow-root /scratch/$USER
#
# It reads, in $FARM_DIR (default ~/.wandb_sync_farm), the same files as
# wandb_sync_farm.service: cert.pem and key.pem (wandb_sync_farm gen-cert),
# and env (chmod 600), one NAME=value a line, for the farm's credentials
# and the W&B API key:
#   WANDB_SYNC_FARM_USERNAME=me
#   WANDB_SYNC_FARM_PASSWORD="a long random string"
#   WANDB_API_KEY=...
#
# Other settings: FARM_SESSION, the tmux session's name (default
# wandb_sync_farm); FARM_COMMAND, how to run the farm (default
# wandb_sync_farm; e.g. "python3 -m wandb_offline_sync.farm").
#
# Login nodes behind one name are separate machines: start the farm on one
# of them (ssh login1), and reattach there.

set -euo pipefail

dir=${FARM_DIR:-$HOME/.wandb_sync_farm}
session=${FARM_SESSION:-wandb_sync_farm}
command=${FARM_COMMAND:-wandb_sync_farm}
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

case "${1:-}" in
start)
    shift
    if tmux has-session -t "$session" 2>/dev/null; then
        echo "the farm's tmux session $session is already there;" \
             "see it with: $0 attach" >&2
        exit 1
    fi
    # The session runs this script again with "run": the command tmux
    # hands to your login shell is then only a quoted path and arguments,
    # whatever that shell is.
    line=$(printf '%q ' "$self" run "$@")
    tmux new-session -d -s "$session" "$line"
    echo "farm started in tmux session $session on $(hostname)"
    echo "watch it: $0 attach    stop it: $0 stop"
    ;;
run)
    # What the tmux session runs: the farm in the foreground.
    shift
    set -a      # export every NAME=value the env file sets
    # shellcheck source=/dev/null
    . "$dir/env"
    set +a
    # $command is split on purpose, so FARM_COMMAND may hold arguments.
    # shellcheck disable=SC2086
    $command --cert "$dir/cert.pem" --key "$dir/key.pem" "$@" || {
        code=$?
        # Keep the pane, and the farm's last words, until someone reads
        # them; `stop` ends the wait too.
        echo "the farm exited with code $code; press Enter to close"
        read -r _ || true
        exit "$code"
    }
    ;;
attach)
    exec tmux attach-session -t "$session"
    ;;
status)
    if tmux has-session -t "$session" 2>/dev/null; then
        echo "the farm's tmux session $session is running"
    else
        echo "no tmux session $session"
        exit 1
    fi
    ;;
stop)
    if ! tmux has-session -t "$session" 2>/dev/null; then
        echo "no tmux session $session" >&2
        exit 1
    fi
    # Ctrl-C is SIGINT: the farm stops taking requests, ends the running
    # syncs and exits 0, and the session closes.
    tmux send-keys -t "$session" C-c
    for _ in $(seq 60); do
        if ! tmux has-session -t "$session" 2>/dev/null; then
            echo "farm stopped"
            exit 0
        fi
        sleep 1
    done
    echo "the farm did not stop within 60 s; see: $0 attach" >&2
    exit 1
    ;;
*)
    echo "usage: $0 start [farm options] | attach | status | stop" >&2
    exit 2
    ;;
esac
