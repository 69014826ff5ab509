"""Started by torchrun from tests/test_distributed.py: `train()` on every rank, no tracking.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py \
        DATASET OUT_DIR '{"steps": 15, ...}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from offpg_offline.config import TrainConfig, build
from offpg_offline.train import train

if __name__ == "__main__":
    dataset, out_dir, raw = sys.argv[1:4]
    train(Path(dataset), build(TrainConfig, "train", json.loads(raw)), out_dir=Path(out_dir))
