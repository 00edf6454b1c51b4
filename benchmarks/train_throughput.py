"""Training throughput (forward + backward + Adam step, samples/s) for a BLCA-sized HEALNet config.

Two modalities: one omic token of 2,200 features and a WSI bag of 4,096 patches x 2,048 features
(ResNet50-sized features), batch 4. CPU runs in fp32; CUDA, when present, in bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from healnet.model import HEALNet, HEALNetConfig, ModalitySpec
from healnet.survival import nll_loss
from healnet.train import autocast


def measure(
    device: torch.device, steps: int, warmup: int, batch: int, patches: int, omic: int, wsi_dim: int
) -> dict:
    torch.manual_seed(0)
    config = HEALNetConfig(modalities=[ModalitySpec("omic", omic), ModalitySpec("wsi", wsi_dim)])
    model = HEALNet(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs = {
        "omic": torch.randn(batch, 1, omic, device=device),
        "wsi": torch.randn(batch, patches, wsi_dim, device=device),
    }
    labels = torch.randint(0, 4, (batch,), device=device)
    events = torch.ones(batch, device=device)

    def step() -> None:
        with autocast(device):
            logits = model(inputs)
        loss = nll_loss(logits.float(), labels, events)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "batch": batch,
        "steps": steps,
        "samples_per_s": round(steps * batch / seconds, 2),
        "ms_per_step": round(1000 * seconds / steps, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patches", type=int, default=4096)
    parser.add_argument("--omic-features", type=int, default=2200)
    parser.add_argument("--wsi-dim", type=int, default=2048)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    shape = (args.batch, args.patches, args.omic_features, args.wsi_dim)
    results = [measure(torch.device("cpu"), args.steps, args.warmup, *shape)]
    if torch.cuda.is_available():
        results.append(measure(torch.device("cuda"), args.steps * 10, args.warmup * 5, *shape))
        results[-1]["speedup_vs_cpu"] = round(results[-1]["samples_per_s"] / results[0]["samples_per_s"], 1)
    print("| device | precision | batch | samples/s | ms/step |")
    print("| --- | --- | --- | --- | --- |")
    for row in results:
        print(
            f"| {row['device']} | {row['precision']} | {row['batch']} | {row['samples_per_s']} | {row['ms_per_step']} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
