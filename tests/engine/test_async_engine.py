"""AsyncLLMEngine in-process: concurrent requests equal offline generation, abort frees KV blocks, the waiting
limit refuses, shutdown drains, and a failing step fails every request instead of hanging them."""
from __future__ import annotations

import asyncio

import pytest

from fovea import LLM, SamplingParams
from fovea.config import EngineConfig
from fovea.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineOverloadedError, RequestAbortedError
from fovea.engine.llm_engine import LLMEngine
from tests.entrypoints import random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.blip2 import build_tiny_blip2

OPTIONS = dict(dtype="float32", num_kv_blocks=96, block_size=4, num_threads=1)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return str(build_tiny_blip2(tmp_path_factory.mktemp("blip_async"), seed=0))


@pytest.fixture(scope="module")
def llm_engine(blip_dir):
    return LLMEngine(EngineConfig.from_kwargs(blip_dir, max_num_seqs=4, **OPTIONS))


def run(engine: LLMEngine, scenario, **kwargs):
    """Run `scenario(async_engine)` inside a fresh event loop with the engine loop started and shut down."""
    async def main():
        async_engine = AsyncLLMEngine(engine, **kwargs)
        async_engine.start()
        try:
            return await scenario(async_engine)
        finally:
            await async_engine.shutdown(timeout_s=30)
    result = asyncio.run(main())
    assert not engine.has_unfinished_requests()
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_usable_blocks
    return result


async def last(stream):
    output = None
    async for output in stream:
        pass
    return output


def test_concurrent_requests_equal_offline_generation(blip_dir, llm_engine):
    prompts = [{"prompt": f"a photo of {'two ' * i}", "multi_modal_data": {"image": random_image(i, 20 + 7 * i, 30)}}
               for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(6)]
    expected = LLM(blip_dir, **OPTIONS).generate(prompts, params, use_tqdm=False)

    async def scenario(engine):
        streams = [await engine.add_request(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        return await asyncio.gather(*(last(s) for s in streams))

    outputs = run(llm_engine, scenario)
    assert [o.outputs[0].token_ids for o in outputs] == [e.outputs[0].token_ids for e in expected]
    assert [o.outputs[0].text for o in outputs] == [e.outputs[0].text for e in expected]
    assert all(o.finished for o in outputs)


def test_abort_frees_blocks_and_ends_the_stream(llm_engine):
    async def scenario(engine):
        stream = await engine.add_request("long", "a photo of", SamplingParams(max_tokens=200, ignore_eos=True))
        reader = stream.__aiter__()
        first = await anext(reader)
        assert not first.finished
        engine.abort("long")
        engine.abort("long")  # twice, and unknown ids, are no-ops
        engine.abort("never-existed")
        with pytest.raises(RequestAbortedError):
            while True:
                await anext(reader)
        stats = await engine.get_stats()
        assert stats.num_unfinished == 0 and stats.num_kv_blocks_used == 0

    run(llm_engine, scenario)


def test_a_bad_request_is_refused_alone(llm_engine):
    async def scenario(engine):
        good = await engine.add_request("good", "a photo of", SamplingParams(max_tokens=5, ignore_eos=True))
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_request("bad", "a photo of", SamplingParams(max_tokens=10_000))
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request("good", "a", SamplingParams())
        return await last(good)

    assert len(run(llm_engine, scenario).outputs[0].token_ids) == 5


def test_waiting_limit_refuses_new_requests(blip_dir):
    engine = LLMEngine(EngineConfig.from_kwargs(blip_dir, max_num_seqs=1, **OPTIONS))
    params = SamplingParams(max_tokens=150, ignore_eos=True)

    async def scenario(async_engine):
        running = await async_engine.add_request("a", "a photo of", params)
        await anext(running.__aiter__())  # admitted: with max_num_seqs=1 the next one waits
        await async_engine.add_request("b", "a photo of", params)
        with pytest.raises(EngineOverloadedError, match="max-waiting-requests=1"):
            await async_engine.add_request("c", "a photo of", params)
        async_engine.abort(["a", "b"])

    run(engine, scenario, max_waiting_requests=1)


def test_shutdown_finishes_running_requests_then_refuses(llm_engine):
    async def scenario(engine):
        stream = await engine.add_request("r", "a photo of", SamplingParams(max_tokens=30, ignore_eos=True))
        shutdown = asyncio.ensure_future(engine.shutdown())
        output = await last(stream)
        await shutdown
        with pytest.raises(RuntimeError, match="not accepting"):
            await engine.add_request("late", "a", SamplingParams())
        return output

    output = run(llm_engine, scenario)
    assert output.finished and len(output.outputs[0].token_ids) == 30


def test_a_failing_step_fails_every_request(blip_dir):
    engine = LLMEngine(EngineConfig.from_kwargs(blip_dir, **OPTIONS))

    def broken_step():
        raise RuntimeError("boom")

    engine.step = broken_step

    async def scenario(async_engine):
        stream = await async_engine.add_request("r", "a photo of", SamplingParams(max_tokens=3))
        with pytest.raises(EngineDeadError, match="boom"):
            await last(stream)
        assert not async_engine.is_running
        with pytest.raises(EngineDeadError):
            await async_engine.add_request("r2", "a photo of", SamplingParams(max_tokens=3))
        engine.abort_request(["r"])

    run(engine, scenario)


def test_iteration_stats_count_tokens_and_latencies(llm_engine):
    class Recorder:
        def __init__(self):
            self.iterations = []

        def record(self, iteration):
            self.iterations.append(iteration)

    recorder = Recorder()

    async def scenario(engine):
        one = await engine.add_request("one", "a photo of", SamplingParams(max_tokens=10, ignore_eos=True))
        two = await engine.add_request("two", "a photo of", SamplingParams(n=2, temperature=1.0, seed=3,
                                                                             max_tokens=5, ignore_eos=True))
        return await asyncio.gather(last(one), last(two))

    one, two = run(llm_engine, scenario, stat_loggers=[recorder])
    iterations = recorder.iterations
    assert sum(i.num_generation_tokens for i in iterations) == 10 + 2 * 5
    assert sum(len(i.time_to_first_token_s) for i in iterations) == 2
    assert sum(len(i.time_per_output_token_s) for i in iterations) == (10 - 1) + (5 - 1)  # n=2 in lockstep
    assert sum(i.num_prompt_tokens for i in iterations) == len(one.prompt_token_ids) + len(two.prompt_token_ids)
    assert sum(i.num_finished for i in iterations) == 2
    assert all(t >= 0 for i in iterations for t in i.time_to_first_token_s + i.time_per_output_token_s)
