"""Training and inference throughput of HEALNet, alone or side by side with the reference HEALNet.

Default: forward + backward + Adam step (samples/s) for a BLCA-sized config of ours (one omic token of 2,200
features and a WSI bag of 4,096 patches x 2,048 features, batch 4); CPU in fp32, CUDA (when present) in
bf16 autocast.

`--against-reference`: the original HEALNet model file (../shared/reference/healnet/reference_healnet.py,
Apache-2.0, imported at run time) and ours at the reference's own BLCA configuration (its README), in one
process, rounds alternating between the two models. Per thread count and bag size it prints training
samples/s (batch 4), inference ms per case (batch 1, no grad) and peak memory of one training step, and
our ratio to the reference. Peak memory is the rise of the peak resident set size over a fresh process's
baseline after building the model and its inputs (one child process per model and setting, so that one
model's high-water mark cannot hide the other's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from healnet.model import HEALNet, HEALNetConfig, ModalitySpec
from healnet.survival import nll_loss
from healnet.train import autocast

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "healnet"
# the reference's BLCA configuration (its README): HealNet(...) arguments
REFERENCE_BLCA = dict(
    n_modalities=2,
    channel_dims=[2189, 2048],
    num_spatial_axes=[1, 1],
    out_dims=4,
    depth=2,
    num_freq_bands=2,
    max_freq=2.0,
    l_c=25,
    l_d=119,
    x_heads=1,
    l_heads=8,
    cross_dim_head=16,
    latent_dim_head=127,
    attn_dropout=0.083,
    ff_dropout=0.473,
    weight_tie_layers=False,
    fourier_encode_data=True,
    self_per_cross_attn=0,
    snn=True,
)
BATCH = 4


def ours_at_reference_config() -> HEALNet:
    """Our HEALNet at the reference's BLCA configuration. Differences that change no cost: our Fourier
    bands are log-spaced and need max_freq > 2 (3.0 here; the reference's 2.0 gives both bands the same
    frequency); the same number of position channels (2 bands: 5 per axis). The reference's SNN
    feed-forward is gated (d -> 8d, x * selu(gate), 4d -> d: 12 d^2 weights); ours is not, so ff_mult 6
    gives it the same 12 d^2 weights and multiply-adds."""
    config = HEALNetConfig(
        modalities=[
            ModalitySpec("omic", 2189, num_freq_bands=2, max_freq=3.0),
            ModalitySpec("wsi", 2048, num_freq_bands=2, max_freq=3.0),
        ],
        n_bins=4,
        depth=2,
        n_latents=25,
        latent_dim=119,
        cross_heads=1,
        cross_dim_head=16,
        latent_heads=8,
        latent_dim_head=127,
        self_per_cross_attn=0,
        attn_dropout=0.083,
        ff_dropout=0.473,
        snn=True,
        ff_mult=6,
    )
    return HEALNet(config)


def reference_model():
    if not (REFERENCE_DIR / "reference_healnet.py").is_file():
        raise SystemExit(f"the reference model file is not in {REFERENCE_DIR}")
    sys.path.insert(0, str(REFERENCE_DIR))
    from reference_healnet import HealNet

    return HealNet(**REFERENCE_BLCA)


class Runner:
    """One model with its optimizer and inputs: a training step and an inference pass."""

    def __init__(self, name: str, patches: int, seed: int = 0):
        torch.manual_seed(seed)
        self.name = name
        self.model = ours_at_reference_config() if name == "ours" else reference_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.omic = torch.randn(BATCH, 1, 2189)
        self.wsi = torch.randn(BATCH, patches, 2048)
        self.labels = torch.randint(0, 4, (BATCH,))
        self.events = torch.ones(BATCH)

    def forward(self, rows: slice):
        omic, wsi = self.omic[rows], self.wsi[rows]
        if self.name == "ours":
            return self.model({"omic": omic, "wsi": wsi})
        return self.model([omic, wsi])

    def train_step(self) -> None:
        self.model.train()
        loss = nll_loss(self.forward(slice(None)), self.labels, self.events)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def infer_case(self) -> None:
        self.model.eval()
        self.forward(slice(0, 1))


def timed(function, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def compare(threads: int, patches: int, rounds: int, steps: int) -> dict:
    """Alternating rounds of the two models in this process; the median round of each."""
    torch.set_num_threads(threads)
    runners = {name: Runner(name, patches) for name in ("reference", "ours")}
    for runner in runners.values():  # warm-up
        runner.train_step()
        runner.infer_case()
    train: dict[str, list[float]] = {name: [] for name in runners}
    infer: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            train[name].append(timed(runner.train_step, steps))
            infer[name].append(timed(runner.infer_case, steps))
    row: dict[str, float] = {"threads": threads, "patches": patches}
    for name in runners:
        row[f"{name}_train_samples_per_s"] = round(BATCH / sorted(train[name])[rounds // 2], 2)
        row[f"{name}_infer_ms_per_case"] = round(1000 * sorted(infer[name])[rounds // 2], 1)
        row[f"{name}_parameters"] = sum(p.numel() for p in runners[name].model.parameters())
    row["train_ratio"] = round(row["ours_train_samples_per_s"] / row["reference_train_samples_per_s"], 2)
    row["infer_ratio"] = round(row["reference_infer_ms_per_case"] / row["ours_infer_ms_per_case"], 2)
    return row


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mib(name: str, threads: int, patches: int) -> float:
    """Run in a child process: the peak RSS rise of two training steps over the built model and inputs.

    The peak is Linux's VmHWM, reset after the set-up (clear_refs 5): a forked child inherits its parent's
    high-water mark, so getrusage's ru_maxrss would start at the parent's peak.
    """
    torch.set_num_threads(threads)
    runner = Runner(name, patches)
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS")
    runner.train_step()
    runner.train_step()
    return (_status_kib("VmHWM") - baseline) / 1024


def measure_memory(threads: int, patches: int) -> dict:
    peaks = {}
    for name in ("reference", "ours"):
        command = [sys.executable, __file__, "--peak-memory-of", name, "--threads", str(threads)]
        command += ["--patches", str(patches)]
        peaks[name] = float(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return {
        "reference_peak_mib": round(peaks["reference"]),
        "ours_peak_mib": round(peaks["ours"]),
        "memory_ratio": round(peaks["ours"] / peaks["reference"], 2),
    }


def against_reference(threads: list[int], patches: list[int], rounds: int, steps: int) -> list[dict]:
    rows = []
    for bag in patches:
        for count in threads:
            rows.append(compare(count, bag, rounds, steps) | measure_memory(count, bag))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(
        "| threads | patches | train samples/s: reference / ours | ratio | inference ms/case: reference / ours "
        "| ratio | peak MiB (train step): reference / ours | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['threads']} | {r['patches']} | {r['reference_train_samples_per_s']} / "
            f"{r['ours_train_samples_per_s']} | {r['train_ratio']}x | {r['reference_infer_ms_per_case']} / "
            f"{r['ours_infer_ms_per_case']} | {r['infer_ratio']}x | {r['reference_peak_mib']} / "
            f"{r['ours_peak_mib']} | {r['memory_ratio']} |"
        )
    return rows


def measure(
    device: torch.device, steps: int, warmup: int, batch: int, patches: int, omic: int, wsi_dim: int
) -> dict:
    torch.manual_seed(0)
    config = HEALNetConfig(modalities=[ModalitySpec("omic", omic), ModalitySpec("wsi", wsi_dim)], n_bins=4)
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
    parser.add_argument("--against-reference", action="store_true", help="side by side with the reference")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch threads (reference mode)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (reference mode)")
    parser.add_argument("--peak-memory-of", choices=["reference", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--patches",
        type=int,
        nargs="+",
        default=None,
        help="bag sizes (default 4096; 4096 and 16384 against the reference)",
    )
    parser.add_argument("--omic-features", type=int, default=2200)
    parser.add_argument("--wsi-dim", type=int, default=2048)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.peak_memory_of:
        print(peak_memory_mib(args.peak_memory_of, args.threads[0], args.patches[0]))
        return
    if args.against_reference:
        results = against_reference(args.threads, args.patches or [4096, 16384], args.rounds, args.steps)
    else:
        shape = (args.batch, (args.patches or [4096])[0], args.omic_features, args.wsi_dim)
        results = [measure(torch.device("cpu"), args.steps, args.warmup, *shape)]
        if torch.cuda.is_available():
            results.append(measure(torch.device("cuda"), args.steps * 10, args.warmup * 5, *shape))
            results[-1]["speedup_vs_cpu"] = round(
                results[-1]["samples_per_s"] / results[0]["samples_per_s"], 1
            )
        print("| device | precision | batch | samples/s | ms/step |")
        print("| --- | --- | --- | --- | --- |")
        for row in results:
            print(
                f"| {row['device']} | {row['precision']} | {row['batch']} | {row['samples_per_s']} | "
                f"{row['ms_per_step']} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
