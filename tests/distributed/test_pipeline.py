"""Pipeline stages in one process: which layers a stage builds, that loading skips exactly the tensors of other
stages (a tensor nobody owns still fails), and the refusals. The stage is set by hand in parallel_state (no
processes needed to build and load a stage); tests/executor/test_pipeline_parallel.py runs real stages."""
from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fovea.distributed import parallel_state as ps
from fovea.distributed.parallel_state import ParallelLayout
from fovea.distributed.pipeline import PPMissingLayer, get_pp_indices
from fovea.models.blip2 import Blip2ForConditionalGeneration
from fovea.models.interfaces import check_pipeline_parallel
from fovea.models.llama import MistralForCausalLM
from fovea.models.llava import LlavaForConditionalGeneration
from fovea.models.weights import load_model
from tests.oracle.blip2 import build_tiny_blip2


@contextlib.contextmanager
def stage(pp_rank: int, pp_size: int):
    saved = ps._state
    ps._state = ps._State(ParallelLayout(1, pp_size, pp_rank), None, None)
    try:
        yield
    finally:
        ps._state = saved


@pytest.mark.parametrize("num_layers, pp_size, expected", [
    (2, 2, [(0, 1), (1, 2)]),
    (5, 2, [(0, 3), (3, 5)]),
    (7, 3, [(0, 2), (2, 5), (5, 7)]),  # the remainder before the last stage, as vLLM's get_pp_indices
    (4, 3, [(0, 1), (1, 3), (3, 4)]),
    (3, 1, [(0, 3)]),
])
def test_stages_are_contiguous_and_even(num_layers, pp_size, expected):
    assert [get_pp_indices(num_layers, r, pp_size) for r in range(pp_size)] == expected


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 is more than the language model's 2 decoder layers"):
        get_pp_indices(2, 0, 3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("blip2_pp"), seed=0, num_layers=3)


def _load(ckpt, pp_rank, pp_size):
    config = transformers.AutoConfig.from_pretrained(ckpt)
    with stage(pp_rank, pp_size):
        model, _ = load_model(Blip2ForConditionalGeneration, config, ckpt, torch.float32)
    return model


def test_each_stage_builds_and_loads_only_its_part(ckpt):
    full = _load(ckpt, 0, 1)
    first, last = _load(ckpt, 0, 2), _load(ckpt, 1, 2)
    decoder_first, decoder_last = first.language_model.model.decoder, last.language_model.model.decoder
    assert (decoder_first.start_layer, decoder_first.end_layer) == (0, 2)
    assert (decoder_last.start_layer, decoder_last.end_layer) == (2, 3)
    assert isinstance(decoder_first.layers[2], PPMissingLayer) and isinstance(decoder_last.layers[0], PPMissingLayer)
    for missing in (first.language_model.lm_head, decoder_first.final_layer_norm, last.vision_model, last.qformer,
                    last.language_projection, decoder_last.embed_tokens, decoder_last.embed_positions):
        assert isinstance(missing, PPMissingLayer)
    # every parameter a stage holds equals the one-stage model's; together they hold all of it
    full_params = dict(full.named_parameters())
    tied = "language_model.model.decoder.embed_tokens.weight"
    for model in (first, last):
        for name, param in model.named_parameters():
            source = tied if name == "language_model.lm_head.weight" else name  # the tied head, on the last stage
            assert torch.equal(param, full_params[source]), name
    held = {n for m in (first, last) for n, _ in m.named_parameters()}
    assert set(full_params) <= held | {"language_model.lm_head.weight"}
    assert sum(p.numel() for p in first.parameters()) < sum(p.numel() for p in full.parameters())


def test_a_tensor_nobody_owns_still_fails(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["language_model.model.decoder.layers.2.bogus.weight"] = torch.zeros(2)  # under a layer stage 0 skips
    tensors["language_model.model.decoder.bogus.weight"] = torch.zeros(2)  # under no module at all
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensor 'language_model.model.decoder.bogus.weight'"):
        _load(bad, 0, 2)


def test_unsupported_models_are_refused_naming_what_is_supported():
    blip2_t5 = transformers.Blip2Config(text_config=transformers.T5Config().to_dict())
    with pytest.raises(ValueError, match="over an OPT language model only, not 't5'; pipeline parallelism supports"):
        check_pipeline_parallel(Blip2ForConditionalGeneration, blip2_t5, 2)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration does not support pipeline parallelism; "
                                         "pipeline parallelism supports OPT"):
        check_pipeline_parallel(LlavaForConditionalGeneration, transformers.LlavaConfig(), 2)
    with pytest.raises(ValueError, match="Mistral has not been verified"):
        check_pipeline_parallel(MistralForCausalLM, transformers.MistralConfig(), 2)
    check_pipeline_parallel(LlavaForConditionalGeneration, transformers.LlavaConfig(), 1)  # one stage: anything
