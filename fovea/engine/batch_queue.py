"""Pipeline micro-batches: up to P scheduled steps in the pipeline at once (P = pipeline_parallel_size), vLLM's
batch queue (`EngineCore.step_with_batch_queue`, `max_concurrent_batches`), written for fovea's engine core.

With one step at a time, stage 0 of a P-stage pipeline idles while the later stages finish step k, so P stages
run no faster than one. Here the engine core dispatches the next batch before the oldest one's reply is back:

    step():  queue not full ──► scheduler.schedule(cap) ──► executor.execute_async() ──► queue   (return [] while
                                                                                               filling the queue)
             queue full, or nothing new to schedule ──► executor.collect(oldest) ──► scheduler.update_from_output()

- Batches never share a request (the scheduler skips requests in flight: scheduler_in_flight.py), so each batch
  is computed from tokens that are already known; stage 0 works on batch k+1 while stage 1 finishes batch k.
- What to put in each batch. On a CPU a decode step of few rows is bound by reading the weights, not by its
  arithmetic: splitting 16 decode rows into two batches of 8 makes every stage read its weights twice per round
  of tokens, which the overlap only pays back when the stages are equal, and costs when they are not (the last
  stage also holds the lm_head). So:
  - prompt work (a waiting request, a prompt chunk) is dispatched beside the batches in flight: prefill and the
    encoders are compute-bound, and the token budget already splits them into steps;
  - decode rows are split into micro-batches only when each gets at least `min_decode_rows` (16: past the rows
    at which a CPU step stops being bound by memory, ~F / bandwidth, 8-13 rows for bf16 on the hosts in
    DESIGN.md), a batch taking its share `ceil(schedulable / free slots)` of the sequences that could run;
  - fewer decode rows than that wait for the batches in flight to land and join them in one batch, so a small
    decode-only load runs one batch at a time, as without micro-batches.
- A step that raised (not a dead executor) is failed as in the one-at-a-time loop (`Scheduler.fail_step`), after
  the batches still in flight have landed: fail_step preempts every running request, which must not be in flight.
- The sampled tokens of a batch reach the stages that do not sample with the next batch sent after its reply
  (fovea.executor.multiproc), which is before any batch that schedules those requests again.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from fovea.engine.scheduler import RequestUpdate, Scheduler
from fovea.engine.scheduler_output import SchedulerOutput
from fovea.executor.base import Executor, ExecutorDeadError, StepFuture

logger = logging.getLogger(__name__)


class BatchQueue:
    def __init__(self, scheduler: Scheduler, executor: Executor, max_batches: int):
        self.scheduler, self.executor = scheduler, executor
        self.max_batches = max_batches
        self.batches: deque[tuple[SchedulerOutput, StepFuture]] = deque()
        self.max_batches_in_flight = 0  # the most steps the executor had dispatched and not yet answered
        self.min_decode_rows = 16  # decode rows a micro-batch needs before decode is split (see the module doc)
        scheduler.track_in_flight = True

    def step(self) -> list[RequestUpdate]:
        free = self.max_batches - len(self.batches)
        if free > 0:
            num_seqs, has_prompt_work = self.scheduler.schedulable()
            if has_prompt_work or not self.batches or num_seqs >= self.min_decode_rows:
                cap = max(-(-num_seqs // free), self.min_decode_rows)
                out = self.scheduler.schedule(cap)
                if out.num_scheduled_tokens or _has_bookkeeping(out):  # finished ids etc. must reach the runners
                    self.batches.append((out, self.executor.execute_async(out)))
                    self.max_batches_in_flight = max(self.max_batches_in_flight, self.executor.num_steps_in_flight)
                    if out.num_scheduled_tokens and free > 1:
                        return []  # fill the pipeline before waiting for its oldest batch
        if not self.batches:
            return []
        return self._land_oldest()

    def _land_oldest(self) -> list[RequestUpdate]:
        out, future = self.batches.popleft()
        return land_step(self.scheduler, out, lambda: self.executor.collect(future), before_failing=self._land_all)

    def _land_all(self) -> list[RequestUpdate]:
        updates: list[RequestUpdate] = []
        while self.batches:
            updates += self._land_oldest()
        return updates


def land_step(scheduler: Scheduler, out: SchedulerOutput, reply: Callable[[], object],
              before_failing: Callable[[], list[RequestUpdate]] = list) -> list[RequestUpdate]:
    """`out`'s reply (`reply()`: the executor's answer) applied to the scheduler, for both engine-core loops.

    A step that raised fails its requests (`Scheduler.fail_step`) and the engine goes on, after `before_failing`
    (the batch queue lands the batches still in flight first); a dead executor, or a step with no request to blame
    (the runner itself is broken), raises."""
    try:
        runner_output = reply()
    except ExecutorDeadError:
        raise
    except Exception as err:
        if not out.num_scheduled_tokens:
            raise
        logger.exception("the model raised in a step of %d sequence(s)", len(out.num_scheduled_tokens))
        return before_failing() + scheduler.fail_step(out, err)
    return scheduler.update_from_output(out, runner_output)


def _has_bookkeeping(out: SchedulerOutput) -> bool:
    return bool(out.finished_request_ids or out.freed_mm_hashes or out.preempted_request_ids or out.blocks_to_copy)
