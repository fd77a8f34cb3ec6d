"""Where the torch-side techniques (AdaRound, AdaQuant, block reconstruction) run: ``--device auto|cpu|cuda``."""

from __future__ import annotations

import logging

log = logging.getLogger("converter")


def resolve_device(device: str) -> str:
    """``auto``/``cuda`` -> ``cuda`` where torch sees a GPU, else ``cpu`` with one log line saying it fell back."""
    import torch

    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    log.log(logging.WARNING if device == "cuda" else logging.INFO,
            "device %s: torch sees no CUDA GPU; the torch-side techniques run on the CPU", device)
    return "cpu"
