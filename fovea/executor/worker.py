"""The worker process: one tensor-/pipeline-parallel rank, looping on the driver's messages.

    spawn ──► bind CPUs, set threads ──► init_parallel (gloo / nccl) ──► ModelRunner (its stage's layers)
          ──► reply "ready" ──► loop: receive a message, run it, reply (WorkerReply), until Shutdown

Only the sampling rank (last stage, TP rank 0) returns a `ModelRunnerOutput`; the others reply None and append
the sampled tokens the driver forwards with the next step. A worker exits when the driver's pipe closes (EOF)
or the driver process is gone (a watchdog thread polls the parent pid), so a killed driver leaves no orphans.
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch

from fovea.executor import messages as m

logger = logging.getLogger("fovea.executor.worker")

_WATCHDOG_PERIOD_S = 0.5


def run_worker(spec: m.WorkerSpec, conn: Connection) -> None:
    """Entry point of a spawned worker (a `multiprocessing` target)."""
    rank = spec.layout.rank
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s fovea worker rank {rank} (pid {os.getpid()}) "
                                                   f"%(levelname)s %(message)s")
    _watch_driver(spec.driver_pid)
    runner = None
    try:
        _place(spec)
        from fovea.distributed.parallel_state import init_parallel
        from fovea.worker.model_runner import ModelRunner

        start = time.perf_counter()
        init_parallel(spec.layout, spec.init_method, spec.backend)
        runner = ModelRunner(spec.config, spec.hf_config, spec.model_cls)
        logger.info("ready in %.1f s (joined the world, loaded the model)", time.perf_counter() - start)
        _reply(conn, m.WorkerReply())
    except BaseException as err:  # noqa: BLE001 - the driver raises it, naming this rank
        _reply(conn, _error_reply(err))
    _loop(spec, conn, runner)


def _loop(spec: m.WorkerSpec, conn: Connection, runner) -> None:
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the driver is gone
            logger.info("the driver's pipe closed; exiting")
            os._exit(0)
        if isinstance(message, m.Shutdown):
            _reply(conn, m.WorkerReply())
            _leave_world()
            return  # a normal exit: multiprocessing's cleanup runs (no leaked-semaphore warnings)
        if runner is None:
            _reply(conn, m.WorkerReply(error=RuntimeError("this worker failed to start")))
            continue
        try:
            value = _handle(spec, runner, message)
            reply = m.WorkerReply(value=value)
        except BaseException as err:  # noqa: BLE001
            reply = _error_reply(err)
        reply.encoder_cache_bytes = sum(t.nbytes for t in runner.encoder_cache.values())
        _reply(conn, reply)


def _handle(spec: m.WorkerSpec, runner, message):
    if isinstance(message, m.ExecuteStep):
        if not runner.is_sampler:
            runner.append_sampled_tokens(message.sampled_token_ids)
        output = runner.execute(message.scheduler_output)
        return output if runner.is_sampler else None
    if isinstance(message, m.DetermineKVBlocks):
        import torch.distributed as dist

        dist.barrier()  # every rank has loaded its weights before any measures what memory is left
        return runner.determine_num_kv_blocks(message.max_model_len, message.max_num_batched_tokens,
                                              message.profile_features)
    if isinstance(message, m.AllocateKVCache):
        return runner.allocate_kv_cache(message.num_blocks)
    if isinstance(message, m.EmbedPixels):
        if message.pixel_values is None:
            return None
        from fovea.engine.pooling import embed_pixels

        return embed_pixels(runner.model, message.pixel_values, message.pooling, spec.config.max_num_seqs)
    if isinstance(message, m.AddLoRA):
        return runner.add_lora(message.lora_request)
    if isinstance(message, m.EnableStructuredOutputs):
        if runner.is_sampler and runner.grammar_compiler is None:
            import transformers

            from fovea.engine.structured_output import GrammarCompiler

            tokenizer = transformers.AutoTokenizer.from_pretrained(spec.config.tokenizer_path)
            runner.grammar_compiler = GrammarCompiler(tokenizer, message.vocab_size,
                                                      spec.config.structured_outputs_limits)
        return None
    raise TypeError(f"unknown worker message {type(message).__name__}")


def _place(spec: m.WorkerSpec) -> None:
    """Bind this rank to its own CPUs (when the driver found enough) and set its torch threads."""
    if spec.cpus is not None:
        os.sched_setaffinity(0, spec.cpus)
        logger.info("bound to CPUs %s, %d torch thread(s)", spec.cpus, spec.num_threads)
    else:
        logger.info("not bound to CPUs (too few allowed CPUs for every rank to have its own); %d torch thread(s)",
                    spec.num_threads)
    torch.set_num_threads(spec.num_threads)


def _watch_driver(driver_pid: int) -> None:
    """Exit when the driver dies, even in the middle of a step (a spawned worker's parent is the driver)."""
    def watch() -> None:
        while True:
            if os.getppid() != driver_pid:
                logger.warning("the driver (pid %d) is gone; exiting", driver_pid)
                os._exit(1)
            time.sleep(_WATCHDOG_PERIOD_S)

    threading.Thread(target=watch, name="fovea-driver-watchdog", daemon=True).start()


def _reply(conn: Connection, reply: m.WorkerReply) -> None:
    try:
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
        data = pickle.dumps(m.WorkerReply(error=RuntimeError(repr(reply.error)), traceback=reply.traceback))
    try:
        conn.send_bytes(data)
    except (BrokenPipeError, OSError):
        os._exit(0)


def _error_reply(err: BaseException) -> m.WorkerReply:
    return m.WorkerReply(error=err, traceback="".join(traceback.format_exception(err)))


def _leave_world() -> None:
    from fovea.distributed.parallel_state import destroy_parallel

    try:
        destroy_parallel()
    except Exception:  # noqa: BLE001 - a peer already gone; the process is ending anyway
        logger.warning("leaving the process group failed", exc_info=True)
