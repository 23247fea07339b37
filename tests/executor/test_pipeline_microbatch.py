"""Pipeline micro-batches in real worker processes (2 stages, gloo): with 16 concurrent BLIP-2 requests (images,
chunked prefill, preemption, prefix-cache hits on blocks computed by a batch still in flight) the greedy ids,
float32 logprobs (within 1e-4) and seeded samples equal one process's; two batches really are in the pipeline at
once (the executor's count of steps sent and not collected, as the engine recorded it); an abort of a request in
flight lands with its batch and emits nothing after it, and the server's engine loop lands it (its KV blocks
freed) even when no other request is left or arrives; `LLM.generate` returns with no batch in flight; a worker killed with batches in flight is an
`ExecutorDeadError`, not a hang."""
from __future__ import annotations

import asyncio
import signal
import time

import psutil
import pytest

from fovea import LLM, SamplingParams
from fovea.engine.async_engine import AsyncLLMEngine, RequestAbortedError
from fovea.executor import ExecutorDeadError
from tests.e2e.blip2_cases import cases as blip2_cases
from tests.executor.test_multiproc import LOGPROBS, STRESS, assert_same
from tests.oracle.blip2 import build_tiny_blip2


@pytest.fixture(scope="module")
def blip2_ckpt(tmp_path_factory):
    return str(build_tiny_blip2(tmp_path_factory.mktemp("blip2"), seed=0, init_gain=2.0))


def many_requests():
    """16 requests: 8 greedy with logprobs, then the same prompts and images again (prefix hits) as 4 longer
    greedy ones and 4 seeded random ones (each with its own generator, so the batch it lands in does not matter)."""
    base = blip2_cases(8)
    prompts = [{"prompt": p, "multi_modal_data": {"image": img}} for p, img, _ in base] * 2
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True) for _, _, m in base]
    params += [SamplingParams(temperature=0.0, max_tokens=m + 3, logprobs=LOGPROBS, ignore_eos=True)
               for _, _, m in base[:4]]
    params += [SamplingParams(temperature=1.0, max_tokens=m, seed=10 + i, logprobs=LOGPROBS, ignore_eos=True)
               for i, (_, _, m) in enumerate(base[4:])]
    return prompts, params


@pytest.fixture(scope="module")
def reference(blip2_ckpt):
    prompts, params = many_requests()
    return LLM(blip2_ckpt, **STRESS).generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def pp_llm(blip2_ckpt):
    llm = LLM(blip2_ckpt, **STRESS, pipeline_parallel_size=2)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def assert_all_blocks_free(engine):
    scheduler = engine.scheduler
    assert not scheduler.requests and scheduler.in_flight == set() and scheduler.finish_on_return == {}
    kv = scheduler.kv_cache_manager
    assert kv.block_pool.num_free_blocks == kv.num_usable_blocks


def test_micro_batches_equal_one_process_with_two_batches_in_flight(pp_llm, reference):
    prompts, params = many_requests()
    outputs = pp_llm.generate(prompts, params, use_tqdm=False)
    assert_same(reference, outputs)
    core = pp_llm.llm_engine.engine_core
    assert core.batch_queue.max_batches_in_flight == 2  # stage 0 had the next batch while stage 1 ran one
    assert core.scheduler.num_preemptions > 0
    assert any(o.num_cached_tokens > 0 for o in outputs[8:])  # the repeated prompts hit the prefix cache
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) > 8  # not degenerate
    assert_all_blocks_free(pp_llm.llm_engine)
    # the offline call returns only once nothing is in the pipeline
    assert core.num_batches_in_flight == 0 and core.executor.num_steps_in_flight == 0


def test_an_abort_in_flight_lands_with_its_batch_and_the_others_are_unchanged(pp_llm, reference):
    engine = pp_llm.llm_engine
    prompts, params = many_requests()
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"a{i}", prompt, sp)
    victim, aborted, after_abort, finished = "a2", False, [], {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if aborted and output.request_id == victim:
                after_abort.append(output)
            if output.finished:
                finished[output.request_id] = output
        request = engine.scheduler.requests.get(victim)
        if not aborted and request is not None and request.num_output_tokens >= 2 \
                and victim in engine.scheduler.in_flight:
            blocks = engine.scheduler.kv_cache_manager.get_block_ids(victim)
            engine.abort_request(victim)
            aborted = True
            # deferred: its blocks are still being written by the stage that holds its batch
            assert engine.scheduler.finish_on_return == {victim: request.status.FINISHED_ABORTED}
            assert engine.scheduler.kv_cache_manager.get_block_ids(victim) == blocks
    assert aborted and after_abort == [] and victim not in finished
    others = [i for i in range(len(prompts)) if f"a{i}" != victim]
    assert_same([reference[i] for i in others], [finished[f"a{i}"] for i in others])
    assert_all_blocks_free(engine)


def test_a_worker_killed_with_batches_in_flight_is_a_clear_error(blip2_ckpt):
    # a small token budget: the prompts take several steps, so a second batch is sent before the first is back
    llm = LLM(blip2_ckpt, dtype="float32", num_threads=1, pipeline_parallel_size=2, max_num_batched_tokens=64)
    engine = llm.llm_engine
    executor = engine.engine_core.executor
    prompts, params = many_requests()
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"k{i}", prompt, sp)
    assert engine.step() == [] and executor.num_steps_in_flight == 1  # the first batch is out, not waited for
    pid = executor.workers[1].process.pid
    psutil.Process(pid).send_signal(signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(ExecutorDeadError, match=rf"worker rank 1 \(pid {pid}\) died with exit code -9 \(SIGKILL\)"):
        for _ in range(50):
            engine.step()
    assert time.monotonic() - start < 10
    assert engine.engine_core.batch_queue.max_batches_in_flight == 2
    with pytest.raises(ExecutorDeadError):  # and stays dead, without waiting
        engine.step()


def test_the_server_loop_lands_the_batch_of_the_only_request_aborted_in_flight(blip2_ckpt):
    """The server's engine loop (AsyncLLMEngine) used to wait for work as soon as no request was unfinished: the
    batch of the last request, aborted while in flight, then stayed in the pipeline and its KV blocks held until
    another request came. Here the only request is aborted right after its first token (the loop sends its next
    decode batch in the same turn), and nothing else is sent."""
    engine = LLM(blip2_ckpt, **STRESS, pipeline_parallel_size=2).llm_engine
    scheduler = engine.scheduler
    prompt, image, _ = blip2_cases(1)[0]
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)

    async def scenario():
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        try:
            stream = await async_engine.add_request("only", {"prompt": prompt, "multi_modal_data": {"image": image}},
                                                    params)
            with pytest.raises(RequestAbortedError):
                async for _ in stream:
                    async_engine.abort("only")
            start = time.monotonic()
            stats = await async_engine.get_stats()
            while stats.num_kv_blocks_used and time.monotonic() - start < 5.0:
                await asyncio.sleep(0.05)
                stats = await async_engine.get_stats()
            return stats, time.monotonic() - start
        finally:
            await async_engine.shutdown(timeout_s=10)

    stats, elapsed = asyncio.run(scenario())
    assert scheduler.num_deferred_finishes == 1  # the abort came while its batch was in flight
    assert stats.num_kv_blocks_used == 0, f"blocks still held {elapsed:.1f} s after the abort: {stats}"
    assert stats.num_unfinished == 0 and stats.num_batches_in_flight == 0
    assert_all_blocks_free(engine)
