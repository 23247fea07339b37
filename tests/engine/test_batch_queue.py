"""The batch queue's choice of micro-batches (fovea.engine.batch_queue), step by step, over the real scheduler and
an executor that answers in order with TOKEN for every request whose chunk reached its last token (the real
executor's ordering contract; the worker processes are tested in tests/executor/test_pipeline_microbatch.py)."""
from collections import deque

from fovea.engine.batch_queue import BatchQueue
from fovea.engine.scheduler import Scheduler, SchedulerConfig
from fovea.executor.base import StepFuture
from tests.engine import make_request, runner_output

TOKEN = 7


class InOrderExecutor:
    """Answers steps in the order they were sent; records each step's requests."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.pending: deque[StepFuture] = deque()
        self.steps: list[list[str]] = []

    def execute_async(self, out) -> StepFuture:
        requests = self.scheduler.requests
        # num_computed_tokens was advanced by schedule(): a request whose chunk ends its tokens samples
        sampled = {rid: [TOKEN] for rid in out.num_scheduled_tokens
                   if requests[rid].num_computed_tokens == requests[rid].num_tokens}
        future = StepFuture(output=runner_output(sampled))
        self.pending.append(future)
        self.steps.append(list(out.num_scheduled_tokens))
        return future

    def collect(self, future: StepFuture):
        while not future.done:
            self.pending.popleft().done = True
        return future.output

    @property
    def num_steps_in_flight(self) -> int:
        return sum(not f.done for f in self.pending)


def engine(num_requests: int, prompt_len: int, max_tokens: int, **overrides):
    kwargs = dict(num_blocks=200, block_size=4, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=64)
    kwargs.update(overrides)
    scheduler = Scheduler(SchedulerConfig(**kwargs))
    for i in range(num_requests):
        scheduler.add_request(make_request(f"r{i}", list(range(i, i + prompt_len)), max_tokens=max_tokens))
    executor = InOrderExecutor(scheduler)
    return scheduler, executor, BatchQueue(scheduler, executor, max_batches=2)


def run(scheduler, queue) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(1000):
        if not (scheduler.requests or queue.batches):
            break
        for update in queue.step():
            tokens.setdefault(update.request_id, []).extend(update.new_token_ids)
    return tokens


def test_few_decode_rows_join_into_one_batch_at_a_time():
    scheduler, executor, queue = engine(num_requests=4, prompt_len=3, max_tokens=4)
    tokens = run(scheduler, queue)
    assert tokens == {f"r{i}": [TOKEN] * 4 for i in range(4)}
    # 4 decode rows are below min_decode_rows: never split, never beside another batch
    assert [len(s) for s in executor.steps if s] == [4, 4, 4, 4]
    assert queue.max_batches_in_flight == 1


def test_prompt_chunks_go_beside_a_batch_in_flight():
    scheduler, executor, queue = engine(num_requests=3, prompt_len=12, max_tokens=2, max_num_batched_tokens=8)
    assert queue.step() == [] and executor.steps == [["r0"]]  # r0's first chunk
    assert queue.step() == [] and executor.steps[1] == ["r1"]  # r0 is in flight: r1's chunk goes beside it
    assert queue.max_batches_in_flight == 2
    assert run(scheduler, queue) == {f"r{i}": [TOKEN] * 2 for i in range(3)}


def test_many_decode_rows_split_into_even_micro_batches_that_keep_their_split():
    scheduler, executor, queue = engine(num_requests=40, prompt_len=2, max_tokens=5)
    tokens = run(scheduler, queue)
    assert tokens == {f"r{i}": [TOKEN] * 5 for i in range(40)}
    assert queue.max_batches_in_flight == 2
    first, second = set(executor.steps[0]), set(executor.steps[1])
    assert len(first) == len(second) == 20 and not first & second
    for step in executor.steps[2:]:  # every later batch is one of the two groups
        assert set(step) in (first, second)
