"""MultiprocExecutor: one spawned worker process per tensor-/pipeline-parallel rank, driven from the engine.

    driver (EngineCore + Scheduler)                      worker rank r (fovea.executor.worker)
      execute(out): pickle ExecuteStep once ──pipe──►      runner.execute(out) ──► reply (output or None)
                    wait for every rank's reply ◄──pipe──  (ranks talk to each other over torch.distributed)

The driver holds no model. Sampling happens on one rank only, the last stage's TP rank 0 (the one whose
`ModelRunnerOutput` comes back): its generators are the only ones, so seeded sampling repeats exactly as in one
process (unseeded sampling too with one step at a time; micro-batches reach the engine's generator in another
order); the other ranks learn the sampled tokens with the next step sent after the reply.

With pipeline stages (P = pipeline_parallel_size > 1) up to P steps are in flight (fovea.engine.batch_queue):
`execute_async` sends a step and returns, `collect` reads the oldest step's replies. The workers need nothing
new: each handles its messages in order and blocks only on the stage before it, and replies come back in the
order the steps were sent. The sends then go through a sender thread, so the engine thread never blocks writing
to a busy worker while that worker blocks writing its reply to the engine (a pipe full both ways).

A worker that dies is noticed by its process sentinel (or its pipe's EOF) while the driver waits, or by a
monitor thread while the engine is idle; the driver raises `ExecutorDeadError` naming the rank, pid and exit
code, stops the other workers and refuses every later call. A rank that raised while its peers are stuck in a
collective waiting for it is the same: after `_STUCK_GRACE_S` the executor is declared dead instead of hanging.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import torch
from torch import nn

from fovea.config import EngineConfig
from fovea.distributed.parallel_state import ParallelLayout
from fovea.engine.request import MultiModalFeature
from fovea.engine.scheduler_output import SchedulerOutput
from fovea.executor import messages as m
from fovea.executor.base import Executor, ExecutorDeadError, StepFuture
from fovea.executor.placement import plan_cpus
from fovea.lora.request import LoRARequest
from fovea.models.interfaces import check_pipeline_parallel, check_tensor_parallel
from fovea.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)

_STUCK_GRACE_S = 10.0  # after one rank raised: how long the others may take to answer before they count as stuck
_POLL_S = 1.0


@dataclass(slots=True, eq=False)
class _Worker:
    rank: int
    process: multiprocessing.process.BaseProcess
    conn: Connection

    def describe(self) -> str:
        # two threads (the engine's and the monitor) may reap the process at once: the loser sees no exit code
        # for a moment, until the winner records it
        deadline = time.monotonic() + 2.0
        while self.process.exitcode is None and time.monotonic() < deadline:
            self.process.join(timeout=0.05)
        code = self.process.exitcode
        if code is None:
            how = "is unresponsive"
        elif code < 0:
            how = f"died with exit code {code} ({signal.Signals(-code).name})"
        else:
            how = f"died with exit code {code}"
        return f"worker rank {self.rank} (pid {self.process.pid}) {how}"


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, hf_config, model_cls: type[nn.Module]):
        self.config = config
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        world_size = tp * pp
        check_pipeline_parallel(model_cls, hf_config, pp)  # before anything is spawned
        check_tensor_parallel(model_cls, tp, hf_config)
        self.output_rank = (pp - 1) * tp  # the last stage's TP rank 0: the one that samples
        self._dead: ExecutorDeadError | None = None
        self._is_shutting_down = False
        self._failure_callbacks: list = []
        # req id -> tokens the sampling rank drew, for the next step sent to the ranks that did not draw them
        self._sampled: dict[str, list[int]] = {}
        self.max_concurrent_batches = pp
        self._pending: deque[StepFuture] = deque()  # steps sent whose replies are not read yet, oldest first
        self._encoder_cache_bytes = 0
        num_threads, cpus = plan_cpus(world_size, config.num_threads)
        self._store_dir = tempfile.mkdtemp(prefix="fovea-dist-")
        init_method = f"file://{os.path.join(self._store_dir, 'store')}"
        backend = "nccl" if _has_cuda() else "gloo"
        from fovea.executor.worker import run_worker

        context = multiprocessing.get_context("spawn")  # never fork a process that has threads and a torch runtime
        self.workers: list[_Worker] = []
        for rank in range(world_size):
            spec = m.WorkerSpec(config, hf_config, model_cls, ParallelLayout(tp, pp, rank), init_method, backend,
                                num_threads, cpus[rank] if cpus else None, os.getpid())
            parent_end, child_end = context.Pipe(duplex=True)
            process = context.Process(target=run_worker, args=(spec, child_end), name=f"fovea-worker-{rank}",
                                      daemon=True)
            process.start()
            child_end.close()
            self.workers.append(_Worker(rank, process, parent_end))
        self._sender = _Sender(self.workers) if pp > 1 else None
        self._finalizer = weakref.finalize(self, _stop_workers, list(self.workers), self._store_dir, self._sender)
        logger.info("started %d worker process(es): tp %d x pp %d, pids %s, %d torch thread(s) each",
                    world_size, tp, pp, [w.process.pid for w in self.workers], num_threads)
        # a weak reference: the monitor must not keep the executor alive (its finalizer stops the workers)
        self._monitor = threading.Thread(target=_watch_workers, args=(weakref.ref(self), list(self.workers)),
                                         name="fovea-worker-monitor", daemon=True)
        self._monitor.start()
        try:
            self._collect("loading the model")
        except BaseException:
            self.shutdown()
            raise

    # ---- the Executor interface ------------------------------------------------------------------------------

    def determine_num_kv_blocks(self, max_model_len: int, max_num_batched_tokens: int,
                                profile_features: list[MultiModalFeature]) -> int:
        replies = self._call(m.DetermineKVBlocks(max_model_len, max_num_batched_tokens, profile_features),
                             "sizing the KV cache")
        counts = [r.value for r in replies]
        logger.info("KV blocks per rank %s: every rank gets the smallest, %d", counts, min(counts))
        return min(counts)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._call(m.AllocateKVCache(num_blocks), "allocating the KV cache")

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.execute_async(scheduler_output))

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepFuture:
        sampled, self._sampled = self._sampled, {}
        self._send(m.ExecuteStep(scheduler_output, sampled))
        future = StepFuture()
        self._pending.append(future)
        return future

    def collect(self, future: StepFuture) -> ModelRunnerOutput:
        while not future.done:
            self._collect_oldest_step()
        if future.error is not None:
            raise future.error
        return future.output

    @property
    def num_steps_in_flight(self) -> int:
        return len(self._pending)

    def _collect_oldest_step(self) -> None:
        future = self._pending[0]
        try:
            replies = self._collect("running a step")
        except ExecutorDeadError:
            raise
        except Exception as err:  # noqa: BLE001 - a rank raised: every rank answered, the pipes stay in step
            future.error = err
        else:
            output: ModelRunnerOutput = replies[self.output_rank].value
            self._sampled.update(zip(output.req_ids, output.sampled_token_ids))
            self._encoder_cache_bytes = replies[0].encoder_cache_bytes  # the first stage runs the encoders
            future.output = output
        future.done = True
        self._pending.popleft()

    def embed_pixels(self, pixel_values: torch.Tensor, pooling: str) -> list[torch.Tensor]:
        # rank 0 is the first stage's TP rank 0: it holds the image side (replicated under TP, on the first stage
        # under PP), so it alone computes and only it receives the pixels
        messages = [m.EmbedPixels(0, pixel_values if rank == 0 else None, pooling) for rank in range(len(self.workers))]
        return self._call_each(messages, "embedding images")[0].value

    def add_lora(self, lora_request: LoRARequest) -> None:
        self._call(m.AddLoRA(lora_request), "loading a LoRA adapter")

    def enable_structured_outputs(self, compiler) -> None:
        self._call(m.EnableStructuredOutputs(compiler.vocab_size), "building the grammar compiler")

    def encoder_cache_bytes(self) -> int:
        return self._encoder_cache_bytes

    def on_failure(self, callback) -> None:
        """Call `callback(ExecutorDeadError)` (from a monitor thread) when a worker dies, even while idle."""
        self._failure_callbacks.append(callback)

    @property
    def dead_error(self) -> ExecutorDeadError | None:
        return self._dead

    def shutdown(self) -> None:
        self._is_shutting_down = True
        self._finalizer()

    # ---- messages ---------------------------------------------------------------------------------------------

    def _call(self, message, what: str) -> list[m.WorkerReply]:
        while self._pending:  # replies come in order: read the steps' first (collect hands them out later)
            self._collect_oldest_step()
        self._send(message, what)
        return self._collect(what)

    def _call_each(self, messages: list, what: str) -> list[m.WorkerReply]:
        """`_call` with one message per rank (messages[rank])."""
        while self._pending:
            self._collect_oldest_step()
        self._send_bytes([pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL) for message in messages], what)
        return self._collect(what)

    def _send(self, message, what: str = "running a step") -> None:
        self._send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), what)  # once, for every rank

    def _send_bytes(self, data: bytes | list[bytes], what: str) -> None:
        """`data` to every rank, or data[rank] to each."""
        if self._dead is not None:
            raise ExecutorDeadError(str(self._dead))
        if self._sender is not None:
            self._sender.send(data)
            return
        for worker in self.workers:
            try:
                worker.conn.send_bytes(data[worker.rank] if isinstance(data, list) else data)
            except (BrokenPipeError, OSError):
                self._die(worker, what)

    def _collect(self, what: str) -> list[m.WorkerReply]:
        """Every rank's reply, watching the processes: a death is an ExecutorDeadError, never a hang."""
        replies: list[m.WorkerReply | None] = [None] * len(self.workers)
        pending = {w.conn: w for w in self.workers}
        sentinels = {w.process.sentinel: w for w in self.workers}
        first_error_at = None
        while pending:
            timeout = _POLL_S if first_error_at is None else first_error_at + _STUCK_GRACE_S - time.monotonic()
            try:
                ready = wait(list(pending) + list(sentinels), max(0.0, timeout))
            except (OSError, ValueError):  # the monitor stopped the workers and closed the pipes meanwhile
                if self._dead is None:
                    raise
                raise ExecutorDeadError(str(self._dead)) from None
            for obj in ready:
                worker = pending.pop(obj, None)
                if worker is not None:
                    replies[worker.rank] = self._receive(worker, what)
                    if replies[worker.rank].error is not None and first_error_at is None:
                        first_error_at = time.monotonic()
            for obj in ready:
                if obj in sentinels and sentinels[obj].conn in pending:
                    self._die(sentinels[obj], what)
            if pending and first_error_at is not None and time.monotonic() >= first_error_at + _STUCK_GRACE_S:
                failed = next(r for r in replies if r is not None and r.error is not None)
                stuck = sorted(w.rank for w in pending.values())
                self._fail(ExecutorDeadError(
                    f"while {what}, worker rank {replies.index(failed)} raised {failed.error!r} and rank(s) {stuck} "
                    f"did not answer within {_STUCK_GRACE_S:.0f} s (waiting for it in a collective); the workers "
                    f"are stopped"))
        errors = [(rank, r) for rank, r in enumerate(replies) if r.error is not None]
        if errors:
            rank, reply = errors[0]
            logger.error("worker rank %d raised while %s:\n%s", rank, what, reply.traceback)
            err = reply.error
            err.add_note(f"(raised in worker rank {rank} while {what})")
            raise err
        return replies

    def _receive(self, worker: _Worker, what: str) -> m.WorkerReply:
        try:
            data = worker.conn.recv_bytes()
        except (EOFError, OSError):
            self._die(worker, what)
        try:
            return pickle.loads(data)
        except Exception as err:  # noqa: BLE001 - an exception class that does not unpickle
            return m.WorkerReply(error=RuntimeError(f"worker rank {worker.rank} replied with something that does "
                                                    f"not unpickle: {err!r}"))

    def _die(self, worker: _Worker, what: str):
        self._fail(ExecutorDeadError(f"{worker.describe()} while {what}; the other workers are stopped and the "
                                     f"engine cannot continue"))

    def _fail(self, err: ExecutorDeadError):
        if self._dead is None:
            self._dead = err
            logger.error("%s", err)
        self.shutdown()
        raise ExecutorDeadError(str(self._dead))


def _watch_workers(executor_ref: weakref.ref, workers: list[_Worker]) -> None:
    """Notice a death while the engine is idle (no call waiting): stop the others, tell whoever asked (the server)."""
    sentinels = {w.process.sentinel: w for w in workers}
    ready = wait(list(sentinels))
    executor = executor_ref()
    if executor is None or executor._is_shutting_down or not executor._finalizer.alive:  # stopped on purpose
        return
    worker = sentinels[ready[0]]
    if executor._dead is None:
        executor._dead = ExecutorDeadError(f"{worker.describe()}; the other workers are stopped and the engine "
                                           f"cannot continue")
        logger.error("%s", executor._dead)
    executor.shutdown()
    for callback in executor._failure_callbacks:
        callback(executor._dead)


class _Sender:
    """Writes the driver's messages to every worker from a thread of its own, in order (pipeline stages only).

    With steps in flight a worker may be busy when the next step is sent to it; a large message (new requests'
    images) then blocks the writer until the worker reads, and the worker may itself be blocked writing a large
    reply (logprobs) that only the engine thread reads. Writing from here keeps the engine thread reading.
    """

    def __init__(self, workers: list[_Worker]):
        self._queue: queue.SimpleQueue[bytes | list[bytes] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(list(workers),), name="fovea-step-sender",
                                        daemon=True)
        self._thread.start()

    def send(self, data: bytes | list[bytes]) -> None:
        """`data` to every worker, or data[rank] to each."""
        self._queue.put(data)

    def close(self, timeout_s: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self, workers: list[_Worker]) -> None:
        while (data := self._queue.get()) is not None:
            for worker in workers:
                try:
                    worker.conn.send_bytes(data[worker.rank] if isinstance(data, list) else data)
                except (BrokenPipeError, OSError):
                    pass  # a dead worker: the engine thread, waiting for its reply, sees its sentinel


def _stop_workers(workers: list[_Worker], store_dir: str, sender: _Sender | None = None) -> None:
    """Ask every worker to exit, then make sure they did (terminate, then kill); remove the rendezvous store."""
    if sender is not None:  # its last writes first, so no Shutdown is interleaved with a step's bytes
        sender.close(timeout_s=2.0)
    data = pickle.dumps(m.Shutdown())
    for worker in workers:
        try:
            if worker.process.is_alive():
                worker.conn.send_bytes(data)
        except (BrokenPipeError, OSError):
            pass
    deadline = time.monotonic() + 5.0
    for worker in workers:
        worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(timeout=2.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=2.0)
        worker.conn.close()
    shutil.rmtree(store_dir, ignore_errors=True)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
