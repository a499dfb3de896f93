from __future__ import annotations

import os

import torch

from paths import ensure_package

# Two cores: one torch process computing at a time, and no oversubscription inside it.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))
ensure_package()
