#!/usr/bin/env bash
# Set up .venv (if needed), then the main job on a shipped CartPole log: train with the default
# estimator (behavior-cloned start), evaluate online, and record the run in ./mlflow.db.
# Extra arguments go to `offpg train`, e.g. `scripts/demo.sh --estimator per-decision`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
dataset=${OFFPG_DEMO_DATASET:-datasets/cartpole-eps}
offpg info "$dataset"
offpg train "$dataset" "$@" | tee /tmp/offpg-demo.$$.log
python - "$dataset" /tmp/offpg-demo.$$.log <<'PY'
import re, sys
from offpg_offline.data.store import read_card
card = read_card(sys.argv[1])
log = open(sys.argv[2]).read()
def grab(key):
    match = re.search(re.escape(key) + r" ([-0-9.e+]+)", log)
    return match.group(1) if match else "n/a"
behavior = card.get("behavior", {}).get("mean_return", "n/a")
behavior = f"{behavior:.1f}" if isinstance(behavior, float) else behavior
print()
print(f"{'policy':<34}{'online return (mean over seeded episodes)':>42}")
print(f"{'behavior policy (from the log)':<34}{behavior:>42}")
print(f"{'behavior cloning (stochastic)':<34}{grab('bc/return_mean'):>42}")
print(f"{'off-policy PG (stochastic)':<34}{grab('online/return_mean'):>42}")
print(f"{'off-policy PG (greedy)':<34}{grab('online/greedy_return_mean'):>42}")
print()
print("Open the run: offpg ui   (or: mlflow ui --backend-store-uri sqlite:///mlflow.db)")
PY
rm -f /tmp/offpg-demo.$$.log
