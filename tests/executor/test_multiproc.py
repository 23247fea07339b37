"""The multi-process executor against the in-process engine: the same greedy ids and logprobs within 1e-4
(float32), with images, chunked prefill and preemption in the batch, and identical random sampling (one rank
samples, with the engine's generators). Real spawned worker processes, torch.distributed (gloo)."""
from __future__ import annotations

import gc
import signal
import time

import psutil
import pytest

from fovea import LLM, SamplingParams
from fovea.executor import ExecutorDeadError, MultiprocExecutor
from fovea.executor.placement import plan_cpus
from tests.e2e import qwen_cases
from tests.e2e.blip2_cases import cases as blip2_cases
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

ATOL = 1e-4
LOGPROBS = 3
# small blocks, small steps, few blocks: prompts are chunked across steps and requests get preempted
STRESS = dict(dtype="float32", block_size=4, max_num_batched_tokens=24, num_kv_blocks=40, num_threads=1)


@pytest.fixture(scope="module")
def blip2_ckpt(tmp_path_factory):
    return str(build_tiny_blip2(tmp_path_factory.mktemp("blip2"), seed=0, init_gain=2.0))


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen"), seed=0))


def blip2_batch():
    prompts = [{"prompt": p, "multi_modal_data": {"image": img}} for p, img, _ in blip2_cases(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True)
              for _, _, m in blip2_cases(6)]
    # random rows: the seeded one with its own generator, the other from the engine's (EngineConfig.seed)
    prompts += prompts[:2]
    params += [SamplingParams(temperature=1.0, max_tokens=8, seed=7, ignore_eos=True, logprobs=LOGPROBS),
               SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, ignore_eos=True)]
    return prompts, params


BLIP2_UNSEEDED_ROW = 7  # blip2_batch's last row draws from the engine's generator


def qwen_batch():
    chosen = [c for c in qwen_cases.cases() if c.name in ("image", "two images", "video and image", "text only")]
    prompts = [c.prompt_dict() for c in chosen]
    params = [SamplingParams(temperature=0.0, max_tokens=c.max_tokens, logprobs=LOGPROBS, ignore_eos=True)
              for c in chosen]
    return prompts, params


def assert_same(reference, outputs):
    for ref, out in zip(reference, outputs, strict=True):
        want, got = ref.outputs[0], out.outputs[0]
        assert got.token_ids == want.token_ids, ref.request_id
        if want.logprobs is None:
            continue
        for step, (w, g) in enumerate(zip(want.logprobs, got.logprobs, strict=True)):
            assert set(w) == set(g), (ref.request_id, step)
            for token_id in w:
                assert abs(w[token_id].logprob - g[token_id].logprob) < ATOL, (ref.request_id, step, token_id)


def run_both(ckpt: str, batch, **options):
    prompts, params = batch
    reference = LLM(ckpt, **options).generate(prompts, params, use_tqdm=False)
    llm = LLM(ckpt, distributed_executor_backend="mp", **options)
    assert isinstance(llm.llm_engine.engine_core.executor, MultiprocExecutor)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return reference, outputs, llm


def test_blip2_one_worker_process_equals_in_process(blip2_ckpt):
    reference, outputs, llm = run_both(blip2_ckpt, blip2_batch(), **STRESS)
    assert_same(reference, outputs)
    assert llm.llm_engine.scheduler.num_preemptions > 0  # the stress settings did preempt
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) > 3  # not degenerate


def test_qwen_one_worker_process_equals_in_process(qwen_ckpt):
    reference, outputs, llm = run_both(qwen_ckpt, qwen_batch(), dtype="float32", block_size=4,
                                       max_num_batched_tokens=32, num_kv_blocks=30, num_threads=1)
    assert_same(reference, outputs)
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_killed_worker_is_a_clear_error_naming_rank_pid_and_signal(blip2_ckpt):
    llm = LLM(blip2_ckpt, dtype="float32", num_threads=1, distributed_executor_backend="mp")
    worker = llm.llm_engine.engine_core.executor.workers[0]
    pid = worker.process.pid
    psutil.Process(pid).send_signal(signal.SIGKILL)
    prompts, params = blip2_batch()
    start = time.monotonic()
    with pytest.raises(ExecutorDeadError, match=rf"worker rank 0 \(pid {pid}\) died with exit code -9 \(SIGKILL\)"):
        llm.generate(prompts, params, use_tqdm=False)
    assert time.monotonic() - start < 10
    with pytest.raises(ExecutorDeadError):  # and stays dead, without waiting
        llm.generate(prompts[:1], params[:1], use_tqdm=False)


def test_deleting_the_llm_stops_its_workers(blip2_ckpt):
    llm = LLM(blip2_ckpt, dtype="float32", num_threads=1, distributed_executor_backend="mp")
    processes = [psutil.Process(w.process.pid) for w in llm.llm_engine.engine_core.executor.workers]
    del llm
    gc.collect()
    gone, alive = psutil.wait_procs(processes, timeout=15)
    assert not alive


def test_too_many_ranks_for_the_cpus_is_refused_before_spawning(blip2_ckpt):
    with pytest.raises(ValueError, match=r"= 5 worker processes is more than 2 per CPU .* at most 2 ranks"):
        plan_cpus(5, None, cpus=[3])
    with pytest.raises(ValueError, match="tensor_parallel_size \\* pipeline_parallel_size = 4096 worker processes"):
        LLM(blip2_ckpt, tensor_parallel_size=4096)
    with pytest.raises(ValueError, match="tensor_parallel_size=0 must be a positive integer"):
        LLM(blip2_ckpt, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="'uni' runs one rank in this process"):
        LLM(blip2_ckpt, pipeline_parallel_size=2, distributed_executor_backend="uni")


def test_cpu_plan_binds_ranks_to_their_own_cpus_only_when_there_are_enough():
    assert plan_cpus(2, None, cpus=[0, 1, 2, 3]) == (2, [[0, 1], [2, 3]])
    assert plan_cpus(2, 1, cpus=[4, 5, 6]) == (1, [[4], [5]])
    assert plan_cpus(4, None, cpus=[0, 1]) == (1, None)  # 4 ranks on 2 CPUs: threads 1 each, unbound
    assert plan_cpus(2, 2, cpus=[0, 1, 2]) == (2, None)


def test_killed_driver_leaves_no_worker_behind(blip2_ckpt, tmp_path):
    import subprocess
    import sys

    script = ("import sys, time\n"
              "from fovea import LLM\n"
              f"llm = LLM({blip2_ckpt!r}, dtype='float32', num_threads=1, distributed_executor_backend='mp')\n"
              "print(*[w.process.pid for w in llm.llm_engine.engine_core.executor.workers], flush=True)\n"
              "time.sleep(600)\n")
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert pids, "the driver printed no worker pid"
        workers = [psutil.Process(p) for p in pids]
        driver.kill()
        driver.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"orphaned workers: {alive}"
    finally:
        driver.kill()


def test_structured_outputs_and_lora_run_in_the_worker(tmp_path):
    """The grammar compiler is built in the sampling rank and an adapter loaded in every rank (their messages):
    the constrained and the adapted outputs equal the in-process engine's."""
    from fovea import LoRARequest, StructuredOutputsParams
    from tests.lora.adapters import make_peft_adapter
    from tests.oracle.qwen2_5_vl import build_tiny_qwen2

    ckpt = str(build_tiny_qwen2(tmp_path / "qwen2", seed=0))
    adapter = make_peft_adapter(ckpt, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"], seed=3)
    lora = LoRARequest("adapter", 1, str(adapter))
    constraints = [StructuredOutputsParams(choice=["yes", "no", "maybe so"]),
                   StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"),
                   StructuredOutputsParams(json={"type": "array", "items": {"type": "integer"}, "maxItems": 3})]
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=c) for c in constraints]
    params += [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=LOGPROBS)] * 2
    prompts = [f"write {i}" for i in range(len(params))]
    adapters = [None] * 4 + [lora]
    options = dict(dtype="float32", block_size=4, num_threads=1, enable_lora=True, max_lora_rank=8)
    reference = LLM(ckpt, **options).generate(prompts, params, lora_request=adapters, use_tqdm=False)
    outputs = LLM(ckpt, **options, distributed_executor_backend="mp").generate(prompts, params,
                                                                              lora_request=adapters, use_tqdm=False)
    assert_same(reference, outputs)
    assert outputs[0].outputs[0].text in ("yes", "no", "maybe so")
    assert outputs[3].outputs[0].token_ids != outputs[4].outputs[0].token_ids  # the adapter changed the output
