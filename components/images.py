"""Container images of the pipeline steps, read from the environment when the pipeline is compiled."""

from __future__ import annotations

import os

DEFAULT_IMAGE = "registry.example.com/healnet/healnet:0.1.0"
DEFAULT_GPU_IMAGE = "registry.example.com/healnet/healnet-gpu:0.1.0"

# CPU steps (components/Dockerfile) and GPU training (components/Dockerfile.gpu).
HEALNET_IMAGE = os.environ.get("HEALNET_IMAGE", DEFAULT_IMAGE)
HEALNET_GPU_IMAGE = os.environ.get("HEALNET_GPU_IMAGE", DEFAULT_GPU_IMAGE)
