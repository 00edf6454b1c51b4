"""How one model is trained: the settings of `healnet.train.fit`, importable without torch (the CLI's
`--help` and the recipes read them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    l1: float = 1e-5
    alpha: float = 0.4
    patience: int = 8
    monitor: str = "c_index"
    max_patches: int | None = 1024
    bin_weights: bool = False
    seed: int = 0
    device: str = "auto"
    modality_dropout: float = (
        0.0  # per training sample, mark each present modality missing with this probability
    )
    # penalties of the model's linear path, fitted alone before the latent path trains (healnet.linear_path):
    # the clinical weights' ridge, and the omic weights' penalty strength (None: the one of
    # linear_omics_ridges with the lowest held-out NLL in a linear_ridge_folds-fold CV of the training patients)
    linear_path_ridge: float = 1e-2
    linear_omics_ridge: float | None = None
    linear_omics_ridges: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0)
    linear_ridge_folds: int = 5
    # the share of the omic penalty that is a lasso (elastic net: strength * (ratio * |w| + (1 - ratio) * w**2));
    # 0: a ridge alone
    linear_omics_l1_ratio: float = 0.0
    # the clinical weights take the omic weights' chosen penalty too, instead of linear_path_ridge (where the
    # path reads an omic table; a clinical-only path keeps linear_path_ridge)
    linear_clinical_shares_penalty: bool = False
    # weights of the linear path's own survival curve to choose from once the members are trained, by the
    # Harrell C of each member's predictions on its own early-stopping patients
    # (healnet.ensemble.choose_linear_blend); empty: the model keeps its configured linear_blend
    linear_blend_choices: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.monitor not in {"loss", "c_index"}:
            raise ValueError(f"monitor must be 'loss' or 'c_index', got {self.monitor!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if not self.linear_omics_ridges or min(self.linear_omics_ridges) <= 0 or self.linear_ridge_folds < 2:
            raise ValueError("linear_omics_ridges must be positive and linear_ridge_folds at least 2")
        if not 0.0 <= self.linear_omics_l1_ratio <= 1.0:
            raise ValueError(f"linear_omics_l1_ratio must be in [0, 1], got {self.linear_omics_l1_ratio}")
        if any(not 0.0 <= weight < 1.0 for weight in self.linear_blend_choices):
            raise ValueError(f"linear_blend_choices must be in [0, 1), got {self.linear_blend_choices}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")

    def to_dict(self) -> dict:
        return asdict(self)
