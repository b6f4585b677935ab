"""Where a process computes: the one device choice of every verb (training, fine-tuning,
distillation, serving). Needs only torch, so any layer may import it.
"""

from __future__ import annotations

import torch

from motian.errors import UserError


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> this rank's CUDA device when there is one, else the CPU; "cuda" -> this rank's
    GPU; anything else as given ("cpu", "cuda:1", "mps"). Asking for CUDA without it fails."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but torch sees no CUDA device "
                            f"(torch {torch.__version__}); use --device cpu")
        if device == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"local rank {local_rank} has no GPU: this node has "
                                f"{torch.cuda.device_count()}; start at most that many "
                                "processes per node")
            device = f"cuda:{local_rank}"
    return torch.device(device)
