"""The HTTP API fuzzed from its own OpenAPI schema: schemathesis against a real `fovea serve` on loopback.

Requests the schema allows (positive) and requests it forbids (negative) are generated for every operation and
sent to the server; each answer must be no 5xx, a status the schema documents, the documented content type, a body
that matches the documented schema, and for every error OpenAI's shape {"error": {message, type, param, code}}.
Negative requests must be refused (4xx). A good share of the positive requests to the generation routes must
reach the engine and come back 200, or the fuzzer only tests validation. `make test` runs a fixed set (derandomized);
`make test-slow` 25x as many random ones (tests/fuzzing.py).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import given
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.entrypoints import ServerProcess
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.fuzzing import PROFILES, fuzz_settings
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

GENERATION_ROUTES = ("POST /v1/chat/completions", "POST /v1/completions")
MIN_SHARE_OK = 0.5  # of the positive requests to the generation routes: they reach the engine and answer 200


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = Path(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("fuzz_qwen"), seed=0))
    # a short context: a request without max_tokens generates what the context leaves, so keep that small; a fixed
    # served name, since the schema lists the names and a temporary path in it would change the derandomized examples
    proc = ServerProcess(model, "--max-model-len", "96", "--num-kv-blocks", "512", "--served-model-name", "fuzz-qwen",
                         log_dir=tmp_path_factory.mktemp("fuzz_server_log"))
    proc.model_dir = model
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server.base_url + "/openapi.json")


def openai_error_shape(ctx, response, case) -> None:
    """Every 4xx and 5xx body is OpenAI's error object, nothing more, nothing less."""
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return None


COMMON_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
                 response_headers_conformance, openai_error_shape]


def fuzz_api(server, schema, mode: GenerationMode, profile: str, num_examples: int, checks) -> Counter:
    """Send `num_examples` generated requests (each operation equally likely); (operation, status) -> count."""
    statuses: Counter = Counter()

    @fuzz_settings(profile, num_examples)
    @given(case=schema.as_strategy(mode))
    def run(case):
        response = case.call(base_url=server.base_url, timeout=120)
        statuses[case.operation.label, response.status_code] += 1
        case.validate_response(response, checks=checks)

    run()
    assert server.proc.poll() is None, server.log_tail()
    return statuses


@pytest.mark.parametrize("profile", PROFILES)
def test_schema_valid_requests_are_answered_and_mostly_reach_the_engine(server, schema, profile):
    statuses = fuzz_api(server, schema, GenerationMode.POSITIVE, profile, 120, COMMON_CHECKS)
    generation = {k: v for k, v in statuses.items() if k[0] in GENERATION_ROUTES}
    num_ok = sum(v for (_, status), v in generation.items() if status == 200)
    share = num_ok / max(1, sum(generation.values()))
    print(f"\npositive: {sorted(statuses.items())}; generation routes answered 200: {share:.0%}")
    assert share >= MIN_SHARE_OK, sorted(statuses.items())
    # the engine is still healthy and idle afterwards: nothing generated here is left running
    assert httpx.get(server.base_url + "/health").status_code == 200
    metrics = server.wait_idle()
    assert metrics["fovea:num_requests_running"] == 0 and metrics["fovea:kv_cache_blocks_used"] == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_schema_violating_requests_are_refused_in_openai_error_shape(server, schema, profile):
    statuses = fuzz_api(server, schema, GenerationMode.NEGATIVE, profile, 80,
                        [*COMMON_CHECKS, negative_data_rejection])
    print(f"\nnegative: {sorted(statuses.items())}")
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_every_undeclared_method_is_405_with_allow_and_unknown_paths_404(server, schema):
    document = httpx.get(server.base_url + "/openapi.json").json()
    methods = {"get", "post", "put", "patch", "delete", "options", "trace"}
    for path, item in document["paths"].items():
        declared = {m for m in item if m in methods}
        for method in sorted(methods - declared):
            response = httpx.request(method.upper(), server.base_url + path)
            assert response.status_code == 405, (method, path, response.text)
            assert set(response.headers["allow"].replace(" ", "").lower().split(",")) == declared, response.headers
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = httpx.get(server.base_url + "/v1/nothing-here")
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_schema_documents_openai_errors_not_fastapi_422(server, schema):
    document = schema.raw_schema
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert "422" not in operation["responses"], (method, path)
            if "requestBody" in operation:
                error = operation["responses"]["400"]["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)
    names = document["components"]["schemas"]
    assert "HTTPValidationError" not in names and "ValidationError" not in names
    # messages are typed: a union on role, user content parts a union on type
    message = names["ChatCompletionRequest"]["properties"]["messages"]["items"]
    assert message["discriminator"]["propertyName"] == "role"
    assert set(message["discriminator"]["mapping"]) == {"system", "developer", "user", "assistant", "tool"}
    user_content = names["UserMessage"]["properties"]["content"]["anyOf"][1]["items"]
    assert set(user_content["discriminator"]["mapping"]) == {"text", "image_url", "video_url"}
    # what this server's model allows: its names, its vocabulary
    completion = names["CompletionRequest"]["properties"]
    served = httpx.get(server.base_url + "/v1/models").json()["data"]
    assert completion["model"]["anyOf"][0]["enum"] == [model["id"] for model in served]
    vocab_size = json.loads((server.model_dir / "config.json").read_text())["text_config"]["vocab_size"]
    token_ids = completion["prompt"]["anyOf"][2]["items"]
    assert token_ids["minimum"] == 0 and token_ids["maximum"] == vocab_size - 1
