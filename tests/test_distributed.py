"""Data-parallel training: two CPU processes on gloo (torchrun) end with the weights of one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from healnet import experiment, fitting
from healnet.recipes import TCGA
from healnet.train import DistributedTrainingError

WORKER = Path(__file__).with_name("distributed_worker.py")


def run_worker(out: Path, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    subprocess.run([*launcher, str(WORKER), str(out)], check=True, env=env, timeout=240)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_gloo_processes_train_the_weights_of_one(tmp_path):
    alone = run_worker(tmp_path / "one.pt", 1)
    parallel = run_worker(tmp_path / "two.pt", 2)
    assert (alone["world_size"], parallel["world_size"]) == (1, 2)
    torch.testing.assert_close(parallel["state"], alone["state"], rtol=1e-4, atol=1e-5)
    for one, two in zip(alone["history"], parallel["history"], strict=True):
        assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
        assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
    # the weights moved: the comparison is not between two untrained models
    untrained = run_worker_untrained_state()
    assert any(not torch.allclose(untrained[k], alone["state"][k]) for k in untrained)


def run_worker_untrained_state() -> dict:
    sys.path.insert(0, str(WORKER.parent))
    try:
        import distributed_worker as worker
    finally:
        sys.path.remove(str(WORKER.parent))
    data = worker.make_data(40)
    ids = list(data.clinical.index)
    bins = worker.SurvivalBins.fit(data.clinical["survival_months"], data.clinical["event"], 4)
    preprocessor = fitting.fit_preprocessor(
        data, ids[:25], ["omic"], worker.OmicsConfig(combine=True, tokens="groups:4"), None
    )
    trained, _, _ = fitting.build_training(
        data, ids[:25], ids[25:], preprocessor, bins, worker.MODEL, worker.CONFIG
    )
    return trained.model.state_dict()


def test_an_ensemble_recipe_is_refused_in_a_data_parallel_run(monkeypatch, tmp_path):
    monkeypatch.setattr(experiment, "process_rank", lambda: (0, 2))
    with pytest.raises(DistributedTrainingError, match="single-model recipes"):
        experiment._train_and_save(None, tmp_path, tmp_path, TCGA, None, None, 0, False, False)
