"""scripts/export_encoders.py: its exports load as healnet weights encoders and give the network's features.

The real builders need torchvision, timm or CONCH, which do not import next to the pinned torch here; a
small network stands in for them, through the same export function and wrapper."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from healnet.preprocess.encoders import IMAGENET_MEAN, IMAGENET_STD, make_encoder

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "export_encoders.py"
spec = importlib.util.spec_from_file_location("export_encoders", SCRIPT)
assert spec and spec.loader
export_encoders = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_encoders)


def tiny_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 16, stride=16), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("export_format, suffix", [("torchscript", ".pt"), ("export", ".pt2")])
def test_an_exported_encoder_loads_in_healnet_with_its_width_and_sha256(tmp_path, export_format, suffix):
    network = tiny_network().eval()
    path = tmp_path / f"tiny_v1{suffix}"
    width, digest = export_encoders.export_encoder(network, path, export_format)
    # the exporter's own TorchScript file: the operator trusts the sha256 it printed
    encoder = make_encoder(
        str(path), device="cpu", trusted=[digest] if export_format == "torchscript" else []
    )
    assert (
        (encoder.dim, encoder.provenance.weights_sha256, encoder.name)
        == (width, digest, "tiny_v1")
        == (
            6,
            digest,
            "tiny_v1",
        )
    )
    patches = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    normalised = (patches / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        expected = network(torch.tensor(normalised.transpose(0, 3, 1, 2), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(encoder.encode(patches), expected, rtol=1e-4, atol=1e-5)


def test_the_wrapper_feeds_the_network_its_own_normalisation_and_size(tmp_path):
    seen = {}

    class Probe(nn.Module):
        def forward(self, pixels):
            seen["pixels"] = pixels
            return pixels.mean(dim=(2, 3))

    wrapped = export_encoders.Renormalised(Probe(), export_encoders.CLIP_MEAN, export_encoders.CLIP_STD, 448)
    raw = torch.full((1, 3, 224, 224), 0.5)
    imagenet = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    wrapped(imagenet.float())
    expected = (0.5 - torch.tensor(export_encoders.CLIP_MEAN)) / torch.tensor(export_encoders.CLIP_STD)
    assert seen["pixels"].shape == (1, 3, 448, 448)
    torch.testing.assert_close(seen["pixels"][0, :, 100, 100], expected, rtol=1e-4, atol=1e-4)
