"""Embeddings with the model in worker processes (tensor_parallel_size=2, pipeline_parallel_size=2, both: real
spawned ranks over gloo) equal the in-process engine's, float32 within 1e-5, for every BLIP-2 pooling. The image
side (ViT, Q-Former, projection) is replicated under TP and on the first stage under PP: the first stage's TP rank 0
computes them alone (`MultiprocExecutor.embed_pixels`). An embed between pipeline steps, with batches in flight,
leaves the generation outputs unchanged. A stage-1 export (no language model) runs in the calling process."""
from __future__ import annotations

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from fovea import LLM
from tests.executor.test_multiproc import STRESS, assert_same, blip2_batch
from tests.engine.test_retrieval_embed import IMAGES as RETRIEVAL_IMAGES
from tests.engine.test_retrieval_embed import TEXTS, build_stage1_export
from tests.oracle.blip2 import build_tiny_blip2

POOLINGS = ("vision", "qformer", "projected")
OPTIONS = dict(dtype="float32", num_threads=1, max_num_seqs=2)  # five images run as three batches


def make_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(37, 41, 3), dtype=np.uint8))


IMAGES = [make_image(i) for i in range(5)]


@pytest.fixture(scope="module")
def blip2_ckpt(tmp_path_factory):
    # vision, Q-Former and text widths all differ, so a stage mix-up cannot go unnoticed by shape alone
    return str(build_tiny_blip2(tmp_path_factory.mktemp("blip2"), seed=0, init_gain=2.0, vision_hidden=24,
                                qformer_hidden=32, text_hidden=40))


@pytest.fixture(scope="module")
def reference(blip2_ckpt):
    llm = LLM(blip2_ckpt, **OPTIONS)
    return {p: torch.stack([o.outputs.embedding for o in llm.embed(IMAGES, pooling=p)]) for p in POOLINGS}


def assert_equal_embeddings(llm, reference):
    for pooling in POOLINGS:
        # half as PIL images, half as vLLM prompts
        inputs = [img if i % 2 else {"prompt": "", "multi_modal_data": {"image": img}} for i, img in enumerate(IMAGES)]
        got = torch.stack([o.outputs.embedding for o in llm.embed(inputs, pooling=pooling)])
        want = reference[pooling]
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert want.std() > 0.1 and (want[0] - want[1]).abs().max() > 1e-2  # not trivial
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp, pp", [(2, 1), (2, 2)])  # PP = 2 alone: the next test
def test_embeddings_in_worker_processes_equal_one_process(blip2_ckpt, reference, tp, pp):
    llm = LLM(blip2_ckpt, **OPTIONS, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        assert len(llm.llm_engine.engine_core.executor.workers) == tp * pp
        assert_equal_embeddings(llm, reference)
        with pytest.raises(ValueError, match="unknown pooling 'mean'"):  # refused in the driver, as in one process
            llm.embed(IMAGES[:1], pooling="mean")
        with pytest.raises(ValueError, match="input 0: BLIP-2 embeddings need an image"):
            llm.embed(["a text"])
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_an_embed_between_pipeline_steps_leaves_generation_unchanged(blip2_ckpt, reference):
    """The server runs embed calls on its engine thread between two steps (AsyncLLMEngine.embed ->
    LLMEngine.embed_many), so with two stages a batch may be in flight: its replies are read first (and handed to
    the batch queue later), then rank 0 embeds."""
    prompts, params = blip2_batch()
    prompts, params = prompts[:6], params[:6]  # the greedy rows
    expected = LLM(blip2_ckpt, **STRESS).generate(prompts, params, use_tqdm=False)
    llm = LLM(blip2_ckpt, **STRESS, pipeline_parallel_size=2)
    try:
        engine = llm.llm_engine
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), prompt, sp)
        finished, embedded = {}, []
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
            if engine.engine_core.has_batches_in_flight() and len(embedded) < len(POOLINGS):
                pooling = POOLINGS[len(embedded)]  # each pooling once: never from the embedding cache
                got = engine.embed_many([(IMAGES, pooling), (["a text"], pooling)])
                assert isinstance(got[1], ValueError)  # a bad call fails alone
                torch.testing.assert_close(torch.stack(got[0]), reference[pooling], atol=1e-5, rtol=1e-5)
                embedded.append(pooling)
        assert embedded == list(POOLINGS)
        assert_same(expected, [finished[str(i)] for i in range(len(prompts))])
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_a_stage1_export_with_parallel_sizes_runs_in_this_process(tmp_path):
    """Blip2ForImageTextRetrieval has no language model: what TP / PP split is absent, and the ViT and Q-Former
    they would replicate (or put on the first stage) run in the calling process, as a worker would run them."""
    folder = build_stage1_export(tmp_path / "stage1")
    one = LLM(str(folder), max_num_seqs=2)
    children = set(psutil.Process().children(recursive=True))
    parallel = LLM(str(folder), max_num_seqs=2, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert set(psutil.Process().children(recursive=True)) == children  # no worker process started
    inputs = RETRIEVAL_IMAGES + TEXTS
    for a, b in zip(one.embed(inputs), parallel.embed(inputs), strict=True):
        torch.testing.assert_close(b.outputs.embedding, a.outputs.embedding, atol=1e-5, rtol=1e-5)
    for method in ("itc", "itm"):
        want = [o.outputs.score for o in one.score(RETRIEVAL_IMAGES, TEXTS, method=method)]
        got = [o.outputs.score for o in parallel.score(RETRIEVAL_IMAGES, TEXTS, method=method)]
        assert got == pytest.approx(want, abs=1e-5)
