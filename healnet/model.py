"""HEALNet: one shared latent array, updated by cross-attention to each modality in turn.

Layout follows lucidrains' perceiver-pytorch. Shapes: b batch, n latents, d latent dim, j context tokens,
h heads, c channels. Missing modalities and padded tokens are handled per sample: their inputs are zeroed
before any arithmetic, padded tokens are masked out of attention, and a missing modality's update is
discarded by position (`torch.where`), so their values can never reach that sample's output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Reduce
from torch import Tensor, nn

from healnet.errors import HEALNetError


class ModelInputError(HEALNetError, ValueError):
    """Inputs, masks or a configuration that the model cannot accept."""


@dataclass
class ModalitySpec:
    name: str
    channels: int  # features per token
    input_axis: int = 1  # 1: (batch, tokens, channels); 2: (batch, h, w, channels)
    num_freq_bands: int = 0  # Fourier position features; 0 disables them
    max_freq: float = 10.0

    def __post_init__(self) -> None:
        if not self.name or "." in self.name:
            raise ModelInputError(f"modality name {self.name!r} must be non-empty and contain no '.'")
        if self.channels < 1:
            raise ModelInputError(f"modality {self.name!r}: channels must be >= 1, got {self.channels}")
        if self.input_axis not in (1, 2):
            raise ModelInputError(f"modality {self.name!r}: input_axis must be 1 or 2, got {self.input_axis}")
        if self.num_freq_bands < 0:
            raise ModelInputError(f"modality {self.name!r}: num_freq_bands must be >= 0")
        if self.num_freq_bands > 0 and self.max_freq <= 2:
            raise ModelInputError(f"modality {self.name!r}: max_freq must be > 2, got {self.max_freq}")
        if self.context_dim == 1:
            raise ModelInputError(
                f"modality {self.name!r}: one channel per token and no position features; the pre-norm "
                "LayerNorm would map every value to the same number (give num_freq_bands > 0)"
            )

    @property
    def context_dim(self) -> int:
        """Channels seen by the cross-attention: the features plus the Fourier position features."""
        if self.num_freq_bands == 0:
            return self.channels
        return self.channels + self.input_axis * (2 * self.num_freq_bands + 1)


_POSITIVE_SIZES = (
    "n_bins",
    "depth",
    "n_latents",
    "latent_dim",
    "cross_heads",
    "cross_dim_head",
    "latent_heads",
    "latent_dim_head",
    "ff_mult",
)


@dataclass
class HEALNetConfig:
    modalities: list[ModalitySpec]
    n_bins: int  # the recipe's (healnet.recipes.Recipe.n_bins), as the survival bins were fitted
    depth: int = 2
    n_latents: int = 16
    latent_dim: int = 64
    cross_heads: int = 1
    cross_dim_head: int = 64
    latent_heads: int = 4
    latent_dim_head: int = 32
    self_per_cross_attn: int = 0
    ff_mult: int = 2
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    weight_tying: bool = False
    snn: bool = False
    # modalities whose values (linear_path_inputs[i] of them for the i-th: tokens x channels) also enter the
    # logits through one linear weight each, shared by all bins: a proportional-odds term beside the latent
    # path. A checkpoint written with one modality holds a name and a count; both read as one-element tuples.
    linear_path: tuple[str, ...] | None = None
    linear_path_inputs: tuple[int, ...] = ()
    # weight w of the linear path alone in a prediction's survival curve: S = (1 - w) S(model) +
    # w S(linear path with its own fitted intercepts); in evaluation mode only (training fits the model)
    linear_blend: float = 0.0

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ModelInputError("the config needs at least one modality")
        names = [spec.name for spec in self.modalities]
        if len(set(names)) != len(names):
            raise ModelInputError(f"modality names must be unique, got {names}")
        if isinstance(self.linear_path, str):
            self.linear_path = (self.linear_path,)
        if isinstance(self.linear_path_inputs, int):
            self.linear_path_inputs = (self.linear_path_inputs,) if self.linear_path_inputs else ()
        self.linear_path_inputs = tuple(self.linear_path_inputs)  # JSON gives a list
        if self.linear_path is not None:
            self.linear_path = tuple(self.linear_path)
            if (
                not self.linear_path
                or any(name not in names for name in self.linear_path)
                or len(self.linear_path_inputs) != len(self.linear_path)
                or min(self.linear_path_inputs) < 1
            ):
                raise ModelInputError(
                    f"linear_path {self.linear_path!r} must name modalities of {names}, with "
                    f"linear_path_inputs >= 1 for each, got {self.linear_path_inputs}"
                )
        for name in _POSITIVE_SIZES:
            if getattr(self, name) < 1:
                raise ModelInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.linear_blend < 1.0 or (self.linear_blend and self.linear_path is None):
            raise ModelInputError(
                f"linear_blend must be in [0, 1) and needs a linear_path, got {self.linear_blend}"
            )
        if self.self_per_cross_attn < 0:
            raise ModelInputError(f"self_per_cross_attn must be >= 0, got {self.self_per_cross_attn}")
        for name in ("attn_dropout", "ff_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ModelInputError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HEALNetConfig:
        _check_keys(cls, data)
        for spec in data.get("modalities", []):
            _check_keys(ModalitySpec, spec)
        modalities = [ModalitySpec(**spec) for spec in data.get("modalities", [])]
        return cls(**{**data, "modalities": modalities})


def _check_keys(cls: type, data: dict) -> None:
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ModelInputError(f"unknown {cls.__name__} keys: {unknown}")


# position features


def fourier_encode(positions: Tensor, max_freq: float, num_bands: int) -> Tensor:
    """(..., axes) positions in [-1, 1] -> (..., axes * (2 * num_bands + 1)) sin/cos features."""
    positions = rearrange(positions, "... a -> ... a 1")
    scales = torch.logspace(
        1.0, math.log2(max_freq / 2), num_bands, base=2, device=positions.device, dtype=positions.dtype
    )
    angles = positions * scales * math.pi
    features = torch.cat((angles.sin(), angles.cos(), positions), dim=-1)
    return rearrange(features, "... a f -> ... (a f)")


def sample_positions(token_mask: Tensor) -> Tensor:
    """(b, *axes) mask -> (b, *axes, len(axes)) grid coordinates in [-1, 1].

    Each axis spans [-1, 1] over the sample's own extent (up to its last real token), so the
    coordinates of real tokens do not depend on how far the batch was padded.
    """
    axes = token_mask.shape[1:]
    coordinates = []
    for axis, size in enumerate(axes, start=1):
        others = tuple(d for d in range(1, token_mask.ndim) if d != axis)
        occupied = token_mask.any(dim=others) if others else token_mask  # (b, size)
        index = torch.arange(size, device=token_mask.device)
        extent = torch.where(occupied, index + 1, 0).amax(dim=-1, keepdim=True)  # (b, 1)
        coordinate = index / (extent - 1).clamp(min=1) * 2 - 1  # (b, size)
        view = [token_mask.shape[0]] + [1] * len(axes)
        view[axis] = size
        coordinates.append(coordinate.view(view).expand(token_mask.shape))
    return torch.stack(coordinates, dim=-1)


class Context(NamedTuple):
    """One modality's input to the cross-attentions."""

    data: Tensor  # (b, j, c) tokens, zero where padded or missing
    positions: Tensor | None  # (b, j, p) Fourier position features, or None
    key_mask: Tensor  # (b, j) True = attend
    has: Tensor  # (b,) the sample has the modality


def _token_moments(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Sum and sum of squares over channels, (b, j, 1) each: two fast reductions (torch.var_mean is an
    order of magnitude slower on CPU for slide-sized bags)."""
    return tokens.sum(dim=-1, keepdim=True), torch.linalg.vector_norm(tokens, dim=-1, keepdim=True).square()


# building blocks


class GEGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    """Pre-norm feed-forward: GEGLU, or SELU with AlphaDropout (self-normalising) when `snn`."""

    def __init__(self, dim: int, mult: int, dropout: float, snn: bool):
        super().__init__()
        hidden = dim * mult
        self.norm = nn.LayerNorm(dim)
        if snn:
            self.net = nn.Sequential(
                nn.Linear(dim, hidden), nn.SELU(), nn.AlphaDropout(dropout), nn.Linear(hidden, dim)
            )
            for layer in self.net:
                if isinstance(layer, nn.Linear):  # LeCun normal init keeps SELU self-normalising
                    nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                    nn.init.zeros_(layer.bias)
        else:
            self.net = nn.Sequential(
                nn.Linear(dim, hidden * 2), GEGLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.norm(x))


class Attention(nn.Module):
    """Multi-head attention of queries x (b, n, d) to context (b, j, c); self-attention without context."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.dropout = dropout
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, query_dim)

    def forward(
        self, x: Tensor, context: Tensor, key_mask: Tensor | None = None, return_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """key_mask (b, j): True = attend. Returns the output and, if asked, the weights (b, h, n, j)."""
        keys, values = self.to_kv(context).chunk(2, dim=-1)
        return self.attend(x, keys, values, key_mask, return_weights)

    def attend(
        self, x: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, return_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of queries x (b, n, d) to keys and values (b, j, heads * dim_head) already projected."""
        q = self.to_q(x)
        q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=self.heads) for t in (q, k, v))
        mask = None if key_mask is None else rearrange(key_mask, "b j -> b 1 1 j")
        dropout = self.dropout if self.training else 0.0

        weights = None
        # under torch.func.vmap (ensemble members trained as one batched model, healnet.ensemble) SDPA has
        # no CPU batching rule and would run member by member: the einsum path batches
        if return_weights or torch._C._functorch.is_batchedtensor(q):
            sim = torch.einsum("b h i e, b h j e -> b h i j", q, k) * self.scale
            if mask is not None:
                sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
            attn = sim.softmax(dim=-1)
            out = torch.einsum("b h i j, b h j e -> b h i e", F.dropout(attn, dropout), v)
            weights = attn if return_weights else None
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)")), weights


class CrossAttentionBlock(nn.Module):
    """One modality's update of the latents: pre-norm cross-attention then feed-forward, both residual."""

    def __init__(self, config: HEALNetConfig, spec: ModalitySpec):
        super().__init__()
        self.norm_latents = nn.LayerNorm(config.latent_dim)
        self.norm_context = nn.LayerNorm(spec.context_dim)
        self.attn = Attention(
            config.latent_dim,
            spec.context_dim,
            config.cross_heads,
            config.cross_dim_head,
            config.attn_dropout,
        )
        self.ff = FeedForward(config.latent_dim, config.ff_mult, config.ff_dropout, config.snn)

    def forward(
        self, latents: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor, return_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """keys and values: the context as `to_kv(norm_context(context))`, projected by `project_contexts`."""
        out, weights = self.attn.attend(self.norm_latents(latents), keys, values, key_mask, return_weights)
        latents = latents + out
        return latents + self.ff(latents), weights


class LatentSelfAttentionBlock(nn.Module):
    """Pre-norm self-attention among the latents then feed-forward, both residual."""

    def __init__(self, config: HEALNetConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.latent_dim)
        self.attn = Attention(
            config.latent_dim,
            config.latent_dim,
            config.latent_heads,
            config.latent_dim_head,
            config.attn_dropout,
        )
        self.ff = FeedForward(config.latent_dim, config.ff_mult, config.ff_dropout, config.snn)

    def forward(self, latents: Tensor) -> Tensor:
        normed = self.norm(latents)
        latents = latents + self.attn(normed, normed)[0]
        return latents + self.ff(latents)


class HEALNetLayer(nn.Module):
    """One depth step: a cross-attention block per modality, then the latent self-attention blocks."""

    def __init__(self, config: HEALNetConfig):
        super().__init__()
        self.cross = nn.ModuleDict(
            {spec.name: CrossAttentionBlock(config, spec) for spec in config.modalities}
        )
        self.latent = nn.ModuleList(
            LatentSelfAttentionBlock(config) for _ in range(config.self_per_cross_attn)
        )

    def cross_block(self, name: str) -> CrossAttentionBlock:
        return cast(CrossAttentionBlock, self.cross[name])

    def latent_blocks(self) -> list[LatentSelfAttentionBlock]:
        return [cast(LatentSelfAttentionBlock, block) for block in self.latent]


# the model


class HEALNet(nn.Module):
    """Hybrid early-fusion attention network: logits (batch, n_bins) from any subset of modalities."""

    def __init__(self, config: HEALNetConfig):
        super().__init__()
        self.config = config
        self.specs = {spec.name: spec for spec in config.modalities}
        self.latents = nn.Parameter(torch.randn(config.n_latents, config.latent_dim))
        # weight tying as in the reference HEALNet: layer 0 has its own weights, layers >= 1 share one set
        first = HEALNetLayer(config)
        if config.weight_tying and config.depth > 1:
            shared = HEALNetLayer(config)
            self.layers = nn.ModuleList([first] + [shared] * (config.depth - 1))
        else:
            self.layers = nn.ModuleList([first] + [HEALNetLayer(config) for _ in range(config.depth - 1)])
        self.to_logits = nn.Sequential(
            Reduce("b n d -> b d", "mean"),
            nn.LayerNorm(config.latent_dim),
            nn.Linear(config.latent_dim, config.n_bins),
        )
        self.linear_path = (
            nn.Linear(sum(config.linear_path_inputs), 1, bias=False)
            if config.linear_path is not None
            else None
        )
        if self.linear_path is not None:
            nn.init.zeros_(self.linear_path.weight)
        if config.linear_blend:  # the bins' intercepts of the linear path alone (healnet.linear_path)
            self.register_buffer("linear_intercepts", torch.zeros(config.n_bins))

    @property
    def fusion_layers(self) -> list[HEALNetLayer]:
        return [cast(HEALNetLayer, layer) for layer in self.layers]

    @property
    def modality_names(self) -> list[str]:
        return list(self.specs)

    def forward(
        self,
        inputs: dict[str, Tensor],
        present: dict[str, Tensor] | None = None,
        token_mask: dict[str, Tensor] | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Logits (batch, n_bins); with `return_attention`, also the cross-attention weights.

        present[name] (batch,) bool: the sample has that modality (absent key: all present).
        token_mask[name] (batch, tokens) or (batch, h, w) bool: True = real token, False = padding.
        Attention weights: {name: [(batch, cross_heads, n_latents, tokens) per layer]} for each modality
        given in `inputs`; zero on padding and for samples missing the modality.
        """
        present, token_mask = present or {}, token_mask or {}
        batch = self._check_inputs(inputs, present, token_mask)
        contexts = {
            name: self._encode(name, data, present.get(name), token_mask.get(name))
            for name, data in inputs.items()
        }
        projected = {name: self.project_contexts(name, context) for name, context in contexts.items()}

        latents: Tensor = repeat(self.latents, "n d -> b n d", b=batch)
        any_present = torch.zeros(batch, dtype=torch.bool, device=latents.device)
        for context in contexts.values():
            any_present = any_present | context.has
        attention: dict[str, list[Tensor]] = {name: [] for name in contexts}

        for depth, layer in enumerate(self.fusion_layers):
            for name in self.modality_names:
                if name not in contexts:
                    continue
                keys, values = projected[name][depth]
                key_mask, has = contexts[name].key_mask, contexts[name].has
                updated, weights = layer.cross_block(name)(latents, keys, values, key_mask, return_attention)
                latents = torch.where(rearrange(has, "b -> b 1 1"), updated, latents)
                if weights is not None:
                    attention[name].append(torch.where(rearrange(has, "b -> b 1 1 1"), weights, 0.0))
            for block in layer.latent_blocks():  # samples without any modality keep the untouched latents
                latents = torch.where(rearrange(any_present, "b -> b 1 1"), block(latents), latents)

        logits = self.to_logits(latents)
        if self.linear_path is not None:
            offset = self._linear_offset(inputs, {name: c.has for name, c in contexts.items()})
            logits = logits + offset
            if self.config.linear_blend and not self.training:
                intercepts = cast(Tensor, self.linear_intercepts)  # a buffer of every model with a blend
                logits = blend_survival(logits, intercepts + offset, self.config.linear_blend)
        return (logits, attention) if return_attention else logits

    def _linear_offset(self, inputs: dict[str, Tensor], has: dict[str, Tensor]) -> Tensor | float:
        """(b, 1) linear term: the sum over the linear-path modalities that a sample has of their values
        times their weights. A modality missing from `inputs`, or from a sample, adds exactly 0."""
        weight = cast(nn.Linear, self.linear_path).weight  # forward calls this only for a model with the path
        names = cast(tuple[str, ...], self.config.linear_path)
        offset: Tensor | float = 0.0  # (b, 1) once a linear-path modality is given
        start = 0
        for name, size in zip(names, self.config.linear_path_inputs, strict=True):
            end = start + size
            if name in inputs:
                values = rearrange(inputs[name], "b ... -> b (...)")
                if values.shape[1] != size:
                    raise ModelInputError(
                        f"modality {name!r}: the linear path expects {size} values per sample, "
                        f"got {values.shape[1]}"
                    )
                values = torch.where(rearrange(has[name], "b -> b 1"), values, 0.0)
                offset = offset + F.linear(values, weight[:, start:end])
            start = end
        return offset

    def _encode(self, name: str, data: Tensor, present: Tensor | None, token_mask: Tensor | None) -> Context:
        """The modality's tokens flattened to (b, j, c), their position features and masks."""
        spec = self.specs[name]
        if token_mask is None:
            token_mask = torch.ones(data.shape[:-1], dtype=torch.bool, device=data.device)
        if present is None:
            present = torch.ones(data.shape[0], dtype=torch.bool, device=data.device)
        positions = None
        if spec.num_freq_bands > 0:
            positions = fourier_encode(sample_positions(token_mask), spec.max_freq, spec.num_freq_bands)
            positions = rearrange(positions.to(data.dtype), "b ... p -> b (...) p")
        data = rearrange(data, "b ... c -> b (...) c")
        real = rearrange(token_mask, "b ... -> b (...)") & rearrange(present, "b -> b 1")
        has = real.any(dim=-1)
        # padded tokens and missing samples are zeroed before any arithmetic (the copy is skipped when every
        # token is real); a missing sample attends to all its (zero) tokens so that no softmax row is empty
        # (some SDPA kernels give NaN there), and its update is discarded afterwards
        if torch._C._functorch.is_batchedtensor(real) or not bool(real.all()):
            data = torch.where(rearrange(real, "b j -> b j 1"), data, 0.0)
        key_mask = real | rearrange(~has, "b -> b 1")
        return Context(data, positions, key_mask, has)

    def project_contexts(self, name: str, context: Context) -> list[tuple[Tensor, Tensor]]:
        """Keys and values of one modality for every layer: `to_kv(norm_context(cat(data, positions)))`.

        The normalised context (b, j, c), the largest tensor of a slide bag, is never materialised: the
        LayerNorm's scale folds into the projection weights, its centring into a rank-one correction and its
        bias into a constant, so every layer's projection is one matmul over the raw data plus per-token
        statistics. Layers with tied weights are projected once.
        """
        blocks = [layer.cross_block(name) for layer in self.fusion_layers]
        unique = list({id(block): block for block in blocks}.values())
        weight = torch.cat([b.attn.to_kv.weight * b.norm_context.weight for b in unique])  # (u * 2i, c)
        shift = torch.cat([b.attn.to_kv.weight @ b.norm_context.bias for b in unique])
        data, channels = context.data, context.data.shape[-1]
        projected = F.linear(data, weight[:, :channels])
        total, squares = _token_moments(data.float())
        if context.positions is not None:
            projected = projected + F.linear(context.positions, weight[:, channels:])
            position_total, position_squares = _token_moments(context.positions.float())
            total, squares = total + position_total, squares + position_squares
        # the variance from the moments in float64: inputs are z-scored, but a token's mean may still be
        # large next to its spread, and E[x²] − E[x]² would cancel in float32
        mean = total.double() / weight.shape[1]
        var = (squares.double() / weight.shape[1] - mean.square()).clamp(min=0.0)
        scale = torch.rsqrt(var + unique[0].norm_context.eps).float()
        kv = (projected - mean.float() * weight.sum(dim=1)) * scale + shift
        per_block = dict(zip(map(id, unique), kv.chunk(len(unique), dim=-1), strict=True))
        projections = []
        for block in blocks:
            keys, values = per_block[id(block)].chunk(2, dim=-1)
            projections.append((keys, values))
        return projections

    def _check_inputs(
        self, inputs: dict[str, Tensor], present: dict[str, Tensor], token_mask: dict[str, Tensor]
    ) -> int:
        """Raise ModelInputError on anything malformed; return the batch size."""
        for what, given in (("inputs", inputs), ("present", present), ("token_mask", token_mask)):
            unknown = sorted(set(given) - set(self.specs))
            if unknown:
                raise ModelInputError(
                    f"unknown modalities in {what}: {unknown}; the model has {self.modality_names}"
                )
        if not inputs:
            raise ModelInputError(f"inputs hold no modality; the model has {self.modality_names}")
        batches = {name: data.shape[0] for name, data in inputs.items()}
        if len(set(batches.values())) != 1:
            raise ModelInputError(f"modalities disagree on the batch size: {batches}")
        batch = next(iter(batches.values()))
        for name, data in inputs.items():
            spec = self.specs[name]
            if data.ndim != spec.input_axis + 2:
                raise ModelInputError(
                    f"modality {name!r}: expected {spec.input_axis + 2} dims "
                    f"(batch, {'tokens' if spec.input_axis == 1 else 'h, w'}, channels), got shape {tuple(data.shape)}"
                )
            if data.shape[-1] != spec.channels:
                raise ModelInputError(
                    f"modality {name!r}: expected {spec.channels} channels, got {data.shape[-1]}"
                )
            if name in token_mask:
                _check_mask(f"token_mask[{name!r}]", token_mask[name], tuple(data.shape[:-1]))
        for name, mask in present.items():
            _check_mask(f"present[{name!r}]", mask, (batch,))
        return batch


def blend_survival(logits: Tensor, other: Tensor | float, weight: float) -> Tensor:
    """The logits (b, n_bins) of the survival curve (1 - weight) S(logits) + weight S(other), where
    S = cumprod(1 - sigmoid): hazards h_k = 1 - S_k / S_(k-1) of the mixed curve, as logits."""
    other = torch.as_tensor(other, dtype=logits.dtype, device=logits.device).expand_as(logits)
    survival = (1 - weight) * torch.cumprod(torch.sigmoid(-logits), 1) + weight * torch.cumprod(
        torch.sigmoid(-other), 1
    )
    before = torch.cat([survival.new_ones(survival.shape[0], 1), survival[:, :-1]], dim=1)
    tiny = torch.finfo(survival.dtype).tiny
    hazards = (1 - survival / before.clamp_min(tiny)).clamp(tiny, 1 - torch.finfo(survival.dtype).eps)
    return torch.logit(hazards)


def _check_mask(what: str, mask: Tensor, shape: tuple[int, ...]) -> None:
    if mask.dtype != torch.bool:
        raise ModelInputError(f"{what} must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ModelInputError(f"{what}: expected shape {shape}, got {tuple(mask.shape)}")
