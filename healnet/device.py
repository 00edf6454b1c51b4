"""Device choice, shared by training and serving (torch only, so that serving can import it)."""

from __future__ import annotations

import torch


def select_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU; in a data-parallel run, this process's GPU."""
    if preference == "auto":
        return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is available")
    return device
