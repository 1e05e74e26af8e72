"""Fuzzing the image routes with OpenAI's own description of them (schemathesis): whatever a client built
from that description sends, the server answers without a 5xx, and every 200 matches OpenAI's response schema.

`openai_images_openapi.json` is a trimmed copy of github.com/openai/openai-openapi (its `info` names the
commit): the three image paths and the schemas they use. Bounded by count and by time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.processes import ServerProcess

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

DESCRIPTION = Path(__file__).with_name("openai_images_openapi.json")
SECONDS = 40.0
EXAMPLES = 60


def openai_schema() -> dict:
    raw = json.loads(DESCRIPTION.read_text())
    # The one documented difference (README, "Tests"): `size` echoes the size rendered, which
    # for Stable Diffusion models is not one of gpt-image's three.
    raw["components"]["schemas"]["ImagesResponse"]["properties"]["size"] = {"type": "string"}
    return raw


def test_openai_described_requests_never_get_a_5xx(server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_dict(openai_schema())
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    deadline = time.monotonic() + SECONDS
    session = requests.Session()
    seen: dict[int, int] = {}

    @given(case=cases)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: object) -> None:
        if time.monotonic() > deadline:
            return
        response = case.call(base_url=server.url + "/v1", session=session, timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    fuzz()
    assert server.alive()
    assert sum(seen.values()) >= 10 and seen.get(200, 0) >= 1, seen  # the response schema was checked
    assert all(status < 500 for status in seen), seen
