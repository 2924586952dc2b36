"""train.py's checkpoints: how they are named, found and described."""
from __future__ import annotations

import re

CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)-step-(\d+)$")  # output_dir/epoch-E-step-G, G = optimizer steps so far
