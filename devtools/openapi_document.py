"""Print the service's OpenAPI document for the default limits, as docs/openapi.json holds it:

python -m devtools.openapi_document > docs/openapi.json
"""

from __future__ import annotations

import json
from typing import Any

from serving.openapi import contract_document
from serving.service import HEALNetService


def document() -> dict:
    """`serving.openapi.contract_document` of BentoML's document of the service, without serving it."""
    service: Any = HEALNetService  # @bentoml.service makes the class a bentoml Service, which mypy cannot see
    return contract_document(json.loads(json.dumps(service.openapi_spec.asdict())))


if __name__ == "__main__":
    print(json.dumps(document(), indent=1, ensure_ascii=False))
