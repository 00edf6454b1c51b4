import json

import pytest
import torch
import torch.nn.functional as F

from healnet.model import HEALNet, HEALNetConfig, ModalitySpec, ModelInputError

BATCH = 3


def make_model(*specs: ModalitySpec, seed: int = 0, **options) -> HEALNet:
    torch.manual_seed(seed)
    options = {
        "n_bins": 4,
        "n_latents": 8,
        "latent_dim": 32,
        "cross_dim_head": 16,
        "latent_dim_head": 8,
        **options,
    }
    return HEALNet(HEALNetConfig(modalities=list(specs), **options)).eval()


def random_inputs(model: HEALNet, batch: int = BATCH, tokens: int = 6, grid: tuple[int, int] = (3, 4)):
    inputs = {}
    for spec in model.config.modalities:
        axes = (tokens,) if spec.input_axis == 1 else grid
        inputs[spec.name] = torch.randn(batch, *axes, spec.channels)
    return inputs


OMIC = ModalitySpec("omic", 5)
WSI = ModalitySpec("wsi", 7, num_freq_bands=3)
GRID = ModalitySpec("grid", 2, input_axis=2, num_freq_bands=2)


@pytest.mark.parametrize(
    "specs", [(OMIC,), (GRID,), (OMIC, WSI), (OMIC, WSI, GRID)], ids=["1d", "2d", "two", "three"]
)
def test_output_shape_for_one_to_three_modalities(specs):
    model = make_model(*specs, n_bins=4)
    logits = model(random_inputs(model))
    assert logits.shape == (BATCH, 4)
    assert torch.isfinite(logits).all()
    assert model.modality_names == [spec.name for spec in specs]


def test_fourier_features_extend_the_context_channels_and_encode_order():
    assert OMIC.context_dim == 5
    assert WSI.context_dim == 7 + 1 * (2 * 3 + 1)
    assert GRID.context_dim == 2 + 2 * (2 * 2 + 1)
    tokens = torch.randn(1, 6, 7)
    reversed_tokens = tokens.flip(1)
    plain = make_model(ModalitySpec("wsi", 7))
    fourier = make_model(WSI)
    # callers pass the raw channels; the position features are added inside
    with pytest.raises(ModelInputError, match="expected 7 channels, got 14"):
        fourier({"wsi": torch.randn(1, 6, WSI.context_dim)})
    # without positions the model sees a set of tokens; with them the order matters
    torch.testing.assert_close(plain({"wsi": tokens}), plain({"wsi": reversed_tokens}))
    assert not torch.allclose(fourier({"wsi": tokens}), fourier({"wsi": reversed_tokens}), atol=1e-4)


@pytest.mark.parametrize("self_per_cross_attn", [0, 1])
def test_missing_modality_changes_nothing_in_that_sample(self_per_cross_attn):
    model = make_model(OMIC, WSI, GRID, self_per_cross_attn=self_per_cross_attn)
    inputs = random_inputs(model)
    present = {"omic": torch.tensor([False, True, False]), "grid": torch.tensor([True, True, False])}
    logits = model(inputs, present)

    for garbage in (torch.randn(BATCH, 6, 5) * 1e30, torch.full((BATCH, 6, 5), float("nan"))):
        changed = model({**inputs, "omic": garbage}, present)
        assert torch.equal(changed[0], logits[0])
        assert torch.equal(changed[2], logits[2])
        assert not torch.allclose(changed[1], logits[1])  # the present sample does see the change

    # sample 0 matches a model run that never saw the omic modality at all
    without_omic = model({"wsi": inputs["wsi"], "grid": inputs["grid"]}, {"grid": present["grid"]})
    torch.testing.assert_close(without_omic[0], logits[0])


def test_all_padding_token_mask_counts_as_missing():
    model = make_model(OMIC, WSI)
    inputs = random_inputs(model)
    token_mask = {"wsi": torch.tensor([[False] * 6, [True] * 6, [True] * 3 + [False] * 3])}
    by_mask = model(inputs, token_mask=token_mask)
    by_presence = model(inputs, present={"wsi": torch.tensor([False, True, True])}, token_mask=token_mask)
    assert torch.equal(by_mask, by_presence)


@pytest.mark.parametrize("spec", [OMIC, WSI], ids=["plain", "fourier"])
def test_padded_tokens_change_nothing(spec):
    model = make_model(spec)
    real = torch.randn(1, 4, spec.channels)
    padded = torch.cat([real, torch.randn(1, 3, spec.channels) * 1e6], dim=1)
    token_mask = {spec.name: torch.tensor([[True] * 4 + [False] * 3])}
    logits = model({spec.name: padded}, token_mask=token_mask)

    repadded = padded.clone()
    repadded[:, 4:] = float("nan")
    assert torch.equal(model({spec.name: repadded}, token_mask=token_mask), logits)
    # and padding is the same as not having those tokens (positions span the sample's own extent)
    torch.testing.assert_close(model({spec.name: real}), logits)


def test_padded_grid_matches_the_unpadded_grid():
    model = make_model(GRID)
    real = torch.randn(1, 2, 3, 2)
    padded = torch.zeros(1, 4, 5, 2)
    padded[:, :2, :3] = real
    token_mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    token_mask[:, :2, :3] = True
    torch.testing.assert_close(
        model({"grid": padded}, token_mask={"grid": token_mask}), model({"grid": real})
    )


def test_other_samples_in_the_batch_do_not_affect_a_sample():
    model = make_model(OMIC, WSI, self_per_cross_attn=1)
    alone = {"omic": torch.randn(1, 6, 5), "wsi": torch.randn(1, 4, 7)}
    batch = {
        "omic": torch.cat([alone["omic"], torch.randn(2, 6, 5)]),
        "wsi": torch.cat([torch.cat([alone["wsi"], torch.zeros(1, 5, 7)], dim=1), torch.randn(2, 9, 7)]),
    }
    wsi_mask = torch.ones(3, 9, dtype=torch.bool)
    wsi_mask[0, 4:] = False
    in_batch = model(batch, present={"omic": torch.tensor([True, False, True])}, token_mask={"wsi": wsi_mask})
    torch.testing.assert_close(in_batch[:1], model(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("self_per_cross_attn", [0, 2])
def test_sample_missing_every_modality_gets_the_untouched_latents(self_per_cross_attn):
    model = make_model(OMIC, WSI, self_per_cross_attn=self_per_cross_attn)
    inputs = random_inputs(model)
    present = {"omic": torch.tensor([False, True, False]), "wsi": torch.tensor([False, False, True])}
    logits, attention = model(inputs, present, return_attention=True)
    assert torch.isfinite(logits).all()
    prior = model.to_logits(model.latents[None])
    torch.testing.assert_close(logits[:1], prior)
    assert torch.equal(model(inputs, present)[0], logits[0])
    for weights in attention.values():
        assert all(torch.equal(layer[0], torch.zeros_like(layer[0])) for layer in weights)


def test_attention_weights_shapes_normalisation_and_agreement_with_sdpa():
    model = make_model(OMIC, GRID, depth=3, cross_heads=2, self_per_cross_attn=1)
    inputs = random_inputs(model)
    omic_mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [True] * 6])
    grid_mask = torch.ones(BATCH, 3, 4, dtype=torch.bool)
    grid_mask[0, 2:] = False
    present = {"grid": torch.tensor([True, True, False])}
    token_mask = {"omic": omic_mask, "grid": grid_mask}

    logits, attention = model(inputs, present, token_mask, return_attention=True)
    torch.testing.assert_close(logits, model(inputs, present, token_mask), rtol=1e-5, atol=1e-5)

    assert set(attention) == {"omic", "grid"}
    expected_shapes = {"omic": (BATCH, 2, 8, 6), "grid": (BATCH, 2, 8, 12)}
    real = {"omic": omic_mask, "grid": grid_mask.flatten(1) & present["grid"][:, None]}
    for name, layers in attention.items():
        assert len(layers) == 3
        for weights in layers:
            assert weights.shape == expected_shapes[name]
            mask = real[name][:, None, None, :].expand_as(weights)
            assert torch.equal(weights[~mask], torch.zeros_like(weights[~mask]))
            sums = weights.sum(-1)
            has = real[name].any(-1)
            torch.testing.assert_close(sums[has], torch.ones_like(sums[has]))
            assert torch.equal(sums[~has], torch.zeros_like(sums[~has]))


def test_weight_tying_shares_every_layer_after_the_first():
    def count(depth: int, tied: bool) -> int:
        model = make_model(OMIC, WSI, depth=depth, weight_tying=tied, self_per_cross_attn=1)
        return sum(p.numel() for p in model.parameters())

    per_layer = count(2, False) - count(1, False)
    assert per_layer > 0
    assert count(4, False) == count(1, False) + 3 * per_layer
    assert count(1, True) == count(1, False)
    assert count(4, True) == count(2, False) == count(1, False) + per_layer


def test_snn_and_self_attention_options_backpropagate():
    model = make_model(OMIC, GRID, snn=True, self_per_cross_attn=2, attn_dropout=0.1, ff_dropout=0.1).train()
    assert any(isinstance(m, torch.nn.AlphaDropout) for m in model.modules())
    assert not any(isinstance(m, torch.nn.GELU) for m in model.modules())
    inputs = random_inputs(model)
    present = {"omic": torch.tensor([True, False, True])}
    loss = F.cross_entropy(model(inputs, present), torch.tensor([0, 1, 2]))
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_bf16_autocast_forward_and_backward():
    model = make_model(OMIC, WSI, GRID, self_per_cross_attn=1).train()
    inputs = random_inputs(model)
    present = {"wsi": torch.tensor([True, False, True])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(inputs, present)
        weighted_logits, attention = model(inputs, present, return_attention=True)
    assert torch.isfinite(logits).all() and torch.isfinite(weighted_logits).all()
    assert all(torch.isfinite(w).all() for layers in attention.values() for w in layers)
    F.cross_entropy(logits.float(), torch.tensor([0, 1, 2])).backward()
    assert torch.isfinite(model.latents.grad).all()


def test_adam_learns_a_toy_problem():
    torch.manual_seed(0)
    signal = torch.randn(64, 5, 4)
    labels = (signal[..., 0].mean(dim=1) > 0).long()  # the label depends on one modality's token mean
    inputs = {"signal": signal, "noise": torch.randn(64, 3, 6)}
    model = make_model(ModalitySpec("signal", 4), ModalitySpec("noise", 6), n_bins=2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_inputs_raise_clear_errors():
    model = make_model(OMIC, GRID)
    inputs = random_inputs(model)
    assert issubclass(ModelInputError, ValueError)
    with pytest.raises(ValueError, match=r"unknown modalities in inputs: \['rna'\]"):
        model({**inputs, "rna": torch.randn(BATCH, 2, 3)})
    with pytest.raises(ValueError, match="modality 'omic': expected 5 channels, got 4"):
        model({**inputs, "omic": torch.randn(BATCH, 6, 4)})
    with pytest.raises(ValueError, match="modality 'grid': expected 4 dims"):
        model({**inputs, "grid": torch.randn(BATCH, 12, 2)})
    with pytest.raises(ValueError, match="disagree on the batch size"):
        model({**inputs, "omic": torch.randn(BATCH + 1, 6, 5)})
    with pytest.raises(ValueError, match="no modality"):
        model({})
    with pytest.raises(ValueError, match=r"present\['omic'\] must be a bool tensor"):
        model(inputs, present={"omic": torch.ones(BATCH)})
    with pytest.raises(ValueError, match=r"token_mask\['grid'\]: expected shape \(3, 3, 4\)"):
        model(inputs, token_mask={"grid": torch.ones(BATCH, 12, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"unknown modalities in present: \['rna'\]"):
        model(inputs, present={"rna": torch.ones(BATCH, dtype=torch.bool)})


def test_config_round_trips_through_json_and_rejects_bad_values():
    config = HEALNetConfig(modalities=[OMIC, GRID], n_bins=4, depth=3, weight_tying=True, snn=True)
    restored = HEALNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    torch.manual_seed(0)
    state = HEALNet(config).state_dict()
    HEALNet(restored).load_state_dict(state)  # same architecture, same parameter names
    with pytest.raises(ValueError, match=r"unknown HEALNetConfig keys: \['layers'\]"):
        HEALNetConfig.from_dict({**config.to_dict(), "layers": 2})
    with pytest.raises(ValueError, match="unique"):
        HEALNetConfig(modalities=[OMIC, OMIC], n_bins=4)
    with pytest.raises(ValueError, match="input_axis must be 1 or 2"):
        ModalitySpec("x", 3, input_axis=3)
    with pytest.raises(ValueError, match="attn_dropout"):
        HEALNetConfig(modalities=[OMIC], n_bins=4, attn_dropout=1.0)


def test_one_channel_tokens_need_position_features():
    with pytest.raises(ModelInputError, match="one channel per token"):
        ModalitySpec("rnaseq", 1)
    assert ModalitySpec("rnaseq", 1, num_freq_bands=2).context_dim == 6


def unfused_projection(model: HEALNet, name: str, context) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values as the model computed them before the folded projection: the normalised
    context materialised, then each layer's to_kv."""
    full = context.data if context.positions is None else torch.cat((context.data, context.positions), dim=-1)
    return [
        layer.cross[name].attn.to_kv(layer.cross[name].norm_context(full)).chunk(2, dim=-1)
        for layer in model.layers
    ]


@pytest.mark.parametrize("weight_tying", [False, True])
@pytest.mark.parametrize("masked", [False, True], ids=["all-real", "padded-and-missing"])
def test_folded_context_projection_equals_layernorm_then_projection(weight_tying, masked, monkeypatch):
    wsi = ModalitySpec("wsi", 40, num_freq_bands=3)
    model = make_model(OMIC, wsi, depth=3, weight_tying=weight_tying, self_per_cross_attn=1).train()
    with torch.no_grad():  # LayerNorm scales and shifts away from their identity initialisation
        for parameter_name, parameter in model.named_parameters():
            if "norm_context" in parameter_name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    inputs = {"omic": torch.randn(BATCH, 1, 5), "wsi": torch.randn(BATCH, 9, 40) * 0.5 + 3.0}  # offset tokens
    token_mask = {"wsi": torch.tensor([[True] * 9, [True] * 4 + [False] * 5, [True] * 9])} if masked else {}
    present = {"omic": torch.tensor([True, False, True])} if masked else {}
    context = model._encode("wsi", inputs["wsi"], None, token_mask.get("wsi"))
    for (k, v), (k_ref, v_ref) in zip(
        model.project_contexts("wsi", context), unfused_projection(model, "wsi", context), strict=True
    ):
        torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)

    torch.manual_seed(1)  # dropout is off, but keep the two passes identical in every respect
    model.eval()
    logits = model(inputs, present, token_mask)
    logits.sum().backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(model, "project_contexts", lambda name, ctx: unfused_projection(model, name, ctx))
    reference = model(inputs, present, token_mask)
    reference.sum().backward()
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    for parameter_name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(fused_grads[parameter_name], parameter.grad, rtol=1e-4, atol=1e-5)
