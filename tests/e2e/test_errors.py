"""Bad input gets a ValueError naming the problem; the engine and the other requests are unharmed."""
from __future__ import annotations

import base64
import io

import pytest
import torch

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import make_image
from tests.oracle.blip2 import build_tiny_blip2


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = build_tiny_blip2(tmp_path_factory.mktemp("blip2_err"), seed=0)
    return LLM(path, dtype="float32", block_size=4, max_model_len=64)


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bad_inputs(tmp_path, llm):
    img = make_image(1, (32, 32))
    num_query, hidden = llm.llm_engine.processor.info.get_embed_shape()
    return {
        "over max_model_len": ({"prompt": "a photo of", "multi_modal_data": {"image": img}},
                               SamplingParams(max_tokens=60), "max_model_len"),
        "too many images": ({"prompt": "a photo of", "multi_modal_data": {"image": [img, img]}},
                            SamplingParams(max_tokens=4), "at most 1"),
        "corrupt bytes": ({"prompt": "a", "multi_modal_data": {"image": _png_bytes(img)[:40] + b"garbage"}},
                          SamplingParams(max_tokens=4), "decode"),
        "unreadable path": ({"prompt": "a", "multi_modal_data": {"image": str(tmp_path / "missing.png")}},
                            SamplingParams(max_tokens=4), "missing.png"),
        "embeds shape": ({"prompt": "a", "multi_modal_data": {"image": torch.zeros(num_query + 1, hidden)}},
                         SamplingParams(max_tokens=4), "image_embeds"),
        "modality": ({"prompt": "a", "multi_modal_data": {"video": [img]}}, SamplingParams(max_tokens=4), "video"),
        "dict item": ({"prompt": "a", "multi_modal_data": {"image": {"foo": 1}}}, SamplingParams(max_tokens=4),
                      r"BLIP-2 cannot take a dict with keys \['foo'\] as an image; pass an image \(PIL\.Image\.Image.*"
                      rf"or precomputed image_embeds as a torch\.Tensor of shape \[{num_query}, {hidden}\]"),
        "embeds dict": ({"prompt": "a",
                         "multi_modal_data": {"image": {"image_embeds": torch.zeros(num_query, hidden)}}},
                        SamplingParams(max_tokens=4), r"BLIP-2 cannot take a dict with keys \['image_embeds'\]"),
    }


def test_each_error_is_a_clear_value_error_and_the_rest_completes(llm, tmp_path):
    engine = llm.llm_engine
    good = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    img = make_image(2, (40, 30))
    expected = llm.generate({"prompt": "a photo of", "multi_modal_data": {"image": img}}, good, use_tqdm=False)
    # inside the engine: good requests are queued, bad ones are refused, the good ones then finish unharmed
    engine.add_request("good-1", {"prompt": "a photo of", "multi_modal_data": {"image": img}}, good)
    for name, (prompt, params, needle) in _bad_inputs(tmp_path, llm).items():
        with pytest.raises(ValueError, match=needle):
            engine.add_request(f"bad-{name}", prompt, params)
    engine.add_request("good-2", {"prompt": "a photo of", "multi_modal_data": {"image": _png_bytes(img)}}, good)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert sorted(done) == ["good-1", "good-2"]
    for out in done.values():
        assert out.outputs[0].token_ids == expected[0].outputs[0].token_ids


def test_generate_names_the_bad_prompt_and_stays_usable(llm, tmp_path):
    img = make_image(3, (50, 50))
    good = {"prompt": "a photo of", "multi_modal_data": {"image": img}}
    bad = {"prompt": "a", "multi_modal_data": {"image": str(tmp_path / "nope.jpg")}}
    with pytest.raises(ValueError, match=r"prompt 1: .*nope\.jpg"):
        llm.generate([good, bad, good], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    outs = llm.generate([good, good], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"),
])
def test_invalid_sampling_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)


def test_unknown_engine_option_lists_valid_ones(tmp_path_factory):
    path = build_tiny_blip2(tmp_path_factory.mktemp("blip2_opt"), seed=0)
    with pytest.raises(TypeError, match="max_num_seqs"):
        LLM(path, max_num_seq=4)
