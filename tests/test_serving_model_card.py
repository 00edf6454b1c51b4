"""GET /model_card on a real `bentoml serve` following the champion: 404 with the error body for a version
registered before model cards were written, then, once a version with a card is promoted and swapped in,
the card of the answering version: the registry's JSON, as `healnet registry card TAG --json` prints it."""

from __future__ import annotations

import json

import httpx
import pytest
from test_model_card import card_of

from devtools.demo import DemoSpec, demo_payload
from healnet.cli import main
from healnet.data.cohort import Cohort
from healnet.data.synth import SynthConfig, synthesize_cohort
from healnet.model_card import card_files, validate_card
from healnet.registry import register_model, set_champion
from serving.openapi import NO_MODEL_CARD

pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow
POLL_S = 0.5
TIMEOUT_S = 60.0
PAYLOAD = demo_payload(DemoSpec(), ("omic",), seed=3)


def test_model_card_answers_for_the_answering_version(
    demo_registry, demo_checkpoint, serve, poll, tmp_path, capsys
):
    synthesize_cohort(tmp_path / "cohort", SynthConfig(patients=40, seed=5, slide_px=768), progress=False)
    cohort = Cohort.load(tmp_path / "cohort")
    with serve(demo_registry, tmp_path / "serve.log", HEALNET_FOLLOW_CHAMPION_S=str(POLL_S)) as url:
        before = httpx.get(f"{url}/model_card", timeout=30)
        assert before.status_code == 404 and before.json() == {
            "error": f"model {demo_registry.tag} has no model card: it was registered before model cards "
            "were written",
            "reason": NO_MODEL_CARD,
        }
        assert httpx.post(f"{url}/model_card", timeout=30).status_code == 405

        tag = register_model(
            demo_checkpoint, files=lambda version: card_files(card_of(demo_checkpoint, cohort, version))
        )
        set_champion(tag, "a version with a model card")

        def answers_with_the_card() -> bool:
            return httpx.get(f"{url}/model_card", timeout=30).status_code == 200

        assert poll(answers_with_the_card, TIMEOUT_S)
        card = httpx.get(f"{url}/model_card", timeout=30).json()
        answering = httpx.post(f"{url}/predict", json=PAYLOAD, timeout=30).json()["model_version"]
    assert card["model"]["version"] == answering == tag
    validate_card(card)
    assert main(["registry", "card", tag, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == card
