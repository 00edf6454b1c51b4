"""Export a trusted patch encoder to a self-contained file that `healnet preprocess-slides --encoder PATH`
and the service (`$HEALNET_ENCODER_DIR`) load with torch alone.

Run it in your own environment, where torchvision, timm or CONCH import and the weights are on disk
(nothing is downloaded by healnet). The exported module takes what healnet feeds every weights encoder:
ImageNet-normalised float32 NCHW patches of 224 px. When the network expects another size or
normalisation (CONCH: 448 px, CLIP statistics), the export wraps it so that it converts its input itself.

    # ImageNet ResNet50 truncated after layer 3 and average-pooled (CLAM's 1024-d features), as TorchScript
    python scripts/export_encoders.py resnet50-trunc --weights resnet50-11ad3fa6.pth --out encoders/ \
        --format torchscript
    # UNI (ViT-L/16, 1024-d): pytorch_model.bin from the gated MahmoodLab/UNI repository
    python scripts/export_encoders.py uni --weights UNI/pytorch_model.bin --out encoders/
    # CONCH (ViT-B/16 image tower, 512-d): pytorch_model.bin from MahmoodLab/CONCH, `pip install conch`
    python scripts/export_encoders.py conch --weights CONCH/pytorch_model.bin --out encoders/

Each export prints its feature width and the sha256 that feature files and checkpoints record. The
file name is the encoder's name in healnet; keep it when copying the file to the service. healnet loads a
.pt2 only when it holds raw tensors and an aten graph (what this script writes), and a TorchScript file only
when its sha256 is in $HEALNET_TRUSTED_ENCODERS (TorchScript loading can run code the file carries).
Requirements: torch (the version healnet pins); torchvision for resnet50-trunc; timm for UNI; the
`conch` package for CONCH.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 224  # what healnet feeds every weights encoder (healnet.preprocess.encoders.ENCODER_INPUT_SIZE)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Renormalised(nn.Module):
    """Adapts a network to healnet's input (ImageNet-normalised, 224 px): undoes the ImageNet
    normalisation, applies the network's own, and resizes to the network's input size."""

    # buffers, registered in __init__ (nn.Module types an attribute it holds as Tensor | Module)
    imagenet_mean: torch.Tensor
    imagenet_std: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, network: nn.Module, mean: tuple, std: tuple, size: int):
        super().__init__()
        self.network = network
        self.size = size
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        pixels = patches * self.imagenet_std + self.imagenet_mean
        if pixels.shape[-1] != self.size:
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return self.network((pixels - self.mean) / self.std)


class ResNet50Trunc(nn.Module):
    """torchvision's ResNet50 up to layer 3, then global average pooling: 1024 features (as in CLAM)."""

    def __init__(self, weights: Path):
        super().__init__()
        from torchvision.models import resnet50

        full = resnet50()
        full.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.trunk = nn.Sequential(
            full.conv1, full.bn1, full.relu, full.maxpool, full.layer1, full.layer2, full.layer3
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.trunk(patches).mean(dim=(2, 3))


def resnet50_trunc(weights: Path) -> nn.Module:
    return ResNet50Trunc(weights)


def uni(weights: Path) -> nn.Module:
    """UNI (ViT-L/16 at 224 px, ImageNet normalisation): the settings of its model card."""
    import timm

    model = timm.create_model(
        "vit_large_patch16_224",
        img_size=224,
        patch_size=16,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
    )
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model


class ConchImage(nn.Module):
    model: Any  # CONCH's CoCa model: the conch package has no types

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, proj_contrast=False, normalize=False)


def conch(weights: Path) -> nn.Module:
    """CONCH's image tower (448 px, CLIP normalisation), wrapped to take healnet's input."""
    from conch.open_clip_custom import create_model_from_pretrained

    model, _ = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=str(weights))
    return Renormalised(ConchImage(model), CLIP_MEAN, CLIP_STD, size=448)


BUILDERS: dict[str, Callable[[Path], nn.Module]] = {
    "resnet50-trunc": resnet50_trunc,
    "uni": uni,
    "conch": conch,
}


def export_encoder(network: nn.Module, path: Path, export_format: str) -> tuple[int, str]:
    """Write `network` (eval mode) as TorchScript (.pt) or torch.export (.pt2) to `path`; returns the
    feature width on a 224 px probe and the file's sha256."""
    network = network.eval()
    probe = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.inference_mode():
        width = int(network(probe).flatten(1).shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    if export_format == "torchscript":
        torch.jit.trace(network, probe).save(str(path))
    else:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(network, (probe,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
    return width, hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("encoder", choices=sorted(BUILDERS), help="which encoder to export")
    parser.add_argument("--weights", type=Path, required=True, help="the encoder's weights file, on disk")
    parser.add_argument("--out", type=Path, required=True, help="folder for the exported file")
    parser.add_argument(
        "--format",
        choices=("export", "torchscript"),
        default="export",
        help="torch.export (.pt2, the default) or TorchScript (.pt, deprecated by torch but still read)",
    )
    parser.add_argument("--name", help="file stem, the encoder's name in healnet (default: ENCODER_v1)")
    args = parser.parse_args(argv)
    if not args.weights.is_file():
        parser.error(f"--weights {args.weights} is not a file")
    suffix = ".pt" if args.format == "torchscript" else ".pt2"
    path = args.out / f"{args.name or args.encoder.replace('-', '_') + '_v1'}{suffix}"
    width, digest = export_encoder(BUILDERS[args.encoder](args.weights), path, args.format)
    print(f"{path}: {width} features, sha256 {digest}")
    if args.format == "torchscript":  # healnet loads TorchScript, which can run code, only when trusted
        print(f"healnet loads it only when trusted: add {digest} to $HEALNET_TRUSTED_ENCODERS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
