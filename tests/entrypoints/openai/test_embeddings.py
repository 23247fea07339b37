"""`fovea serve` on a tiny BLIP-2: /v1/embeddings equals `LLM.embed` on the same images (PNG round trip is
lossless), through raw HTTP (float), the openai client (base64) and vLLM's chat form; refusals are 400s."""
from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import torch

from fovea import LLM
from tests.entrypoints import ServerProcess, data_url, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.blip2 import build_tiny_blip2

MODEL = "tiny-blip2"
IMAGES = [random_image(i, 40 + 3 * i, 33) for i in range(3)]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("blip2_embed"), vision_hidden=24, qformer_hidden=32,
                            text_hidden=40)


@pytest.fixture(scope="module")
def server(blip_dir, tmp_path_factory):
    proc = ServerProcess(blip_dir, "--served-model-name", MODEL, "--dtype", "float32",
                         log_dir=tmp_path_factory.mktemp("blip2_embed_log"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def expected(blip_dir):
    llm = LLM(str(blip_dir), dtype="float32")
    return {pooling: [o.outputs.embedding for o in llm.embed(IMAGES, pooling=pooling)]
            for pooling in ("projected", "qformer", "vision")}


def image_part(image):
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def post(server, body):
    return httpx.post(server.base_url + "/v1/embeddings", json=body, timeout=120)


@pytest.mark.parametrize("pooling", ["projected", "qformer", "vision"])
def test_float_embeddings_equal_llm_embed(server, expected, pooling):
    reply = post(server, {"model": MODEL, "input": [image_part(img) for img in IMAGES], "pooling": pooling})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"] == MODEL and [d["index"] for d in body["data"]] == [0, 1, 2]
    for data, want in zip(body["data"], expected[pooling]):
        assert data["object"] == "embedding"
        torch.testing.assert_close(torch.tensor(data["embedding"]), want, atol=1e-6, rtol=1e-6)
    assert body["usage"]["prompt_tokens"] == sum(e.shape[0] for e in expected[pooling])


def test_openai_client_base64_is_the_flat_matrix(server, expected):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    # the client asks for base64 and decodes it into one flat float32 list per input
    out = client.embeddings.create(model=MODEL, input=[image_part(IMAGES[1])])  # type: ignore[arg-type]
    flat = np.asarray(out.data[0].embedding, dtype=np.float32)
    np.testing.assert_array_equal(flat, expected["projected"][1].numpy().reshape(-1))


def test_chat_form_embeds_its_one_image(server, expected):
    reply = post(server, {"messages": [{"role": "user", "content": [image_part(IMAGES[2])]}], "pooling": "qformer"})
    assert reply.status_code == 200, reply.text
    torch.testing.assert_close(torch.tensor(reply.json()["data"][0]["embedding"]), expected["qformer"][2],
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("body, message", [
    ({"input": "a photo of a cat"}, "input 0: BLIP-2 embeddings need an image"),
    ({"input": [image_part(IMAGES[0]), "two circles"]}, "input 1: BLIP-2 embeddings need an image"),
    ({"input": [image_part(IMAGES[0])], "pooling": "mean"},
     "unknown pooling 'mean'; this model offers projected, qformer, vision"),
    ({"messages": [{"role": "user", "content": "hello"}]}, "a chat embedding is of one image"),
    ({"messages": [{"role": "user", "content": [image_part(IMAGES[0]), image_part(IMAGES[1])]}]},
     "messages hold 2 images"),
    ({"input": [image_part(IMAGES[0])], "dimensions": 8}, "dimensions is not supported"),
    ({}, "give exactly one of input"),
    ({"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}, "could not decode"),
])
def test_bad_requests_are_400_naming_the_problem(server, body, message):
    reply = post(server, body)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]["message"]
    # the server still serves afterwards
    assert post(server, {"input": [image_part(IMAGES[0])]}).status_code == 200


def test_concurrent_requests_each_get_their_own_answer(server, expected):
    """Requests that arrive together are run as one batch on the engine thread (AsyncLLMEngine.embed): each gets
    its own embeddings, repeated images included, and a bad one its own 400 while the others succeed."""
    import asyncio

    bodies = [{"input": [image_part(IMAGES[i % 3]), image_part(IMAGES[(i + 1) % 3])], "pooling": "projected"}
              for i in range(6)]
    bodies.insert(3, {"input": [image_part(IMAGES[0])], "pooling": "sideways"})

    async def send_all():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies))

    replies = asyncio.run(send_all())
    bad = replies.pop(3)
    assert bad.status_code == 400 and "unknown pooling 'sideways'" in bad.text, bad.text
    for i, reply in enumerate(replies):
        assert reply.status_code == 200, reply.text
        for data, image in zip(reply.json()["data"], (i % 3, (i + 1) % 3)):
            torch.testing.assert_close(torch.tensor(data["embedding"]), expected["projected"][image],
                                       atol=1e-6, rtol=1e-6)


def test_embeddings_from_a_tensor_parallel_server_equal_llm_embed(blip_dir, expected, tmp_path):
    """`fovea serve -tp 2`: the model is in two worker processes; the first (TP rank 0) computes the image side,
    replicated on both ranks, and the embeddings are one process's."""
    proc = ServerProcess(blip_dir, "--served-model-name", MODEL, "--dtype", "float32", "--tensor-parallel-size", "2",
                         log_dir=tmp_path)
    try:
        for pooling, want in expected.items():
            reply = post(proc, {"model": MODEL, "input": [image_part(img) for img in IMAGES], "pooling": pooling})
            assert reply.status_code == 200, reply.text
            got = [torch.tensor(d["embedding"]) for d in reply.json()["data"]]
            torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-5, rtol=1e-5)
        reply = post(proc, {"model": MODEL, "input": ["a text"]})
        assert reply.status_code == 400 and "need an image" in reply.text
    finally:
        proc.stop()
