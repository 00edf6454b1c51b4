"""Container images of the pipeline steps, read from the environment when the pipeline is compiled."""

from __future__ import annotations

import functools
import os

from kfp import dsl

from healnet import __version__

# The image tag is the package version (pyproject.toml, read from the installed metadata).
DEFAULT_IMAGE = f"registry.example.com/healnet/healnet:{__version__}"
DEFAULT_GPU_IMAGE = f"registry.example.com/healnet/healnet-gpu:{__version__}"

# CPU steps (components/Dockerfile) and GPU training (components/Dockerfile.gpu).
HEALNET_IMAGE = os.environ.get("HEALNET_IMAGE", DEFAULT_IMAGE)
HEALNET_GPU_IMAGE = os.environ.get("HEALNET_GPU_IMAGE", DEFAULT_GPU_IMAGE)

# Every step: our image as base, imports inside the function and nothing installed at run time.
cpu_component = functools.partial(
    dsl.component, base_image=HEALNET_IMAGE, packages_to_install=[], install_kfp_package=False
)
gpu_component = functools.partial(
    dsl.component, base_image=HEALNET_GPU_IMAGE, packages_to_install=[], install_kfp_package=False
)
