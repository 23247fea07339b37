"""Pipeline micro-batches' side of the scheduler: requests whose batch is dispatched but whose reply has not come
back ("in flight"). Only the engine core's batch queue (fovea.engine.batch_queue, pipeline_parallel_size > 1)
turns this on (`track_in_flight`); with one batch at a time nothing here runs and `in_flight` stays empty.

- A request belongs to at most one batch in flight: `schedule()` skips it until `land()` is called with its batch
  (its sampled token must come back before the next step can feed it, and its prompt chunks keep their order).
- A request in flight is never a preemption victim: its blocks are being written by the stages that hold its
  batch, so they stay its own until the reply lands. The victim is the most recently admitted request *not* in
  flight (the one being scheduled, at worst, which then waits).
- Finishing a request in flight from outside (an abort, a stop string the detokenizer found) is deferred: it is
  recorded in `finish_on_return` and applied when its batch lands, before that batch's tokens are taken, so its
  blocks are freed only once no stage writes them and no token of it is emitted after the finish.

`InFlight` is a part of `Scheduler` (scheduler.py), kept apart by concern: it reads and writes the scheduler's
`running`, `requests` and `finish_requests`.
"""
from __future__ import annotations

from fovea.engine.request import Request, RequestStatus
from fovea.engine.scheduler_output import SchedulerOutput


class InFlight:
    def init_in_flight(self) -> None:
        self.track_in_flight = False  # set by the engine core's batch queue
        self.in_flight: set[str] = set()  # request ids of batches dispatched and not yet landed
        self.finish_on_return: dict[str, RequestStatus] = {}  # finished from outside while in flight
        self.num_deferred_finishes = 0  # finishes recorded in finish_on_return, since start

    def schedulable(self) -> tuple[int, bool]:
        """What a new batch could hold now: (sequences unfinished and not in flight, within `max_num_seqs` running;
        whether any of them has prompt work: a waiting request, or a running one with more than one token to
        compute). Without prompt work a batch is decode rows only."""
        in_flight = self.in_flight
        num = min(len(self.requests) - len(in_flight), self.config.max_num_seqs - len(in_flight))
        has_prompt_work = bool(self.waiting) or any(
            r.num_tokens - r.num_computed_tokens > 1 for r in self.running if r.request_id not in in_flight)
        return num, has_prompt_work

    def _pop_victim(self) -> Request:
        """The request to preempt: the most recently admitted one not in flight (`running` always holds one,
        the request being scheduled, so this never fails)."""
        if not self.in_flight:
            return self.running.pop()
        for i in range(len(self.running) - 1, -1, -1):
            if self.running[i].request_id not in self.in_flight:
                return self.running.pop(i)
        raise AssertionError("every running request is in flight, the one being scheduled included")

    def _defer_finish(self, request_id: str, status: RequestStatus) -> bool:
        """Record a finish of a request in flight (the first one wins); False if it is not in flight."""
        if request_id not in self.in_flight:
            return False
        if request_id not in self.finish_on_return:
            self.finish_on_return[request_id] = status
            self.num_deferred_finishes += 1
        return True

    def land(self, scheduler_output: SchedulerOutput) -> None:
        """Its batch's reply is back (or its step failed): its requests leave the flight and finishes recorded
        meanwhile apply now (update_from_output then skips them: no token after the finish)."""
        in_flight, deferred = self.in_flight, self.finish_on_return
        for rid in scheduler_output.num_scheduled_tokens:
            in_flight.discard(rid)
            status = deferred.pop(rid, None) if deferred else None
            if status is not None:
                self.finish_requests(rid, status)
