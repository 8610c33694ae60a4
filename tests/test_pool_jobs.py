"""The pool's job queue and its jobs' state changes, as bookkeeping: no worker, no I/O."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncmp._pool import protocol
from asyncmp._pool.job import ABANDONED, DONE, QUEUED, SENT, WITHDRAWN, Job
from asyncmp._pool.jobqueue import JobQueue
from asyncmp._pool.protocol import OK
from tests.support import pool_workers as w

pytestmark = pytest.mark.anyio


class FakeSlot:
    """What a job knows of the worker it was sent to."""

    def __init__(self) -> None:
        self.doomed = False

    def doom(self) -> None:
        self.doomed = True


def counts(queue: JobQueue) -> tuple[int, int, int, int]:
    return queue.queued, queue.running, queue.done, queue.failed


def queued_job(queue: JobQueue, calls: int, delivered: list[Job]) -> Job:
    job = queue.new_job(w.echo, [(i,) for i in range(calls)], delivered.append)
    queue.enqueue(job)
    return job


def reply(job: Job, values: list[Any]) -> None:
    job.read_reply((OK, job.id, values, None, 0.0, 0, False))


async def test_a_job_cut_at_a_quota_goes_back_to_the_front_for_the_rest() -> None:
    queue = JobQueue()
    delivered: list[Job] = []
    job = queued_job(queue, 5, delivered)
    other = queued_job(queue, 1, delivered)
    assert counts(queue) == (6, 0, 0, 0) and job.state == QUEUED
    assert await queue.next_job() is job
    slot = FakeSlot()
    queue.assign([job], slot, 3)  # a worker with 3 calls left before it is replaced
    assert (job.state, job.slot, job.part) == (SENT, slot, 3)
    assert counts(queue) == (3, 3, 0, 0)
    reply(job, [0, 1, 2])
    queue.complete(job)
    assert (job.state, job.slot, job.offset, job.part) == (QUEUED, None, 3, 0)
    assert counts(queue) == (3, 0, 3, 0) and not delivered
    assert await queue.next_job() is job  # before the job queued after it
    queue.assign([job], slot, None)
    reply(job, [3, 4])
    queue.complete(job)
    assert job.state == DONE and delivered == [job]
    assert [job.outcome(i) for i in range(5)] == [0, 1, 2, 3, 4]
    assert job.payload == b"" and job.arglist == []  # the arguments are not kept
    assert counts(queue) == (1, 0, 5, 0)
    assert await queue.next_job() is other


async def test_withdrawn_and_abandoned_jobs_are_never_delivered() -> None:
    queue = JobQueue()
    delivered: list[Job] = []
    withdrawn = queued_job(queue, 2, delivered)
    abandoned = queued_job(queue, 1, delivered)
    queue.withdraw(withdrawn)
    assert withdrawn.state == WITHDRAWN and counts(queue) == (1, 0, 0, 0)
    assert await queue.next_job() is abandoned  # the withdrawn one is skipped
    slot = FakeSlot()
    queue.assign([abandoned], slot, None)
    queue.withdraw(abandoned, kill=True)
    assert abandoned.state == ABANDONED and slot.doomed
    reply(abandoned, [0])
    queue.complete(abandoned)
    assert abandoned.state == ABANDONED and not delivered
    assert counts(queue) == (0, 0, 1, 0)


async def test_jobs_a_dead_worker_never_started_go_back_in_their_order() -> None:
    queue = JobQueue()
    delivered: list[Job] = []
    jobs = [queued_job(queue, 1, delivered) for _ in range(3)]
    batch = [await queue.next_job() for _ in jobs]
    queue.assign(batch, FakeSlot(), None)
    queue.withdraw(jobs[1])  # its caller went away while it was sent
    queue.give_back(jobs)
    assert [job.state for job in jobs] == [QUEUED, ABANDONED, QUEUED]
    assert counts(queue) == (2, 0, 0, 0)
    assert [await queue.next_job(), await queue.next_job()] == [jobs[0], jobs[2]]


async def test_closing_fails_queued_jobs_and_refuses_new_ones() -> None:
    queue = JobQueue()
    delivered: list[Job] = []
    job = queued_job(queue, 2, delivered)
    queue.close()
    assert queue.closed and delivered == [job] and counts(queue) == (0, 0, 0, 2)
    with pytest.raises(anyio.ClosedResourceError):
        job.outcome(0)
    with pytest.raises(anyio.ClosedResourceError):
        queue.enqueue(queue.new_job(w.echo, [(1,)], delivered.append))


async def test_a_wait_that_does_not_take_the_job_wakes_a_worker_that_does() -> None:
    queue = JobQueue()
    delivered: list[Job] = []
    taken: list[Job | None] = []
    woken: list[bool] = []

    async def wait() -> None:  # a worker task that waits to start a replacement
        await queue.next_job(take=False)
        woken.append(True)

    async def take() -> None:  # an idle worker task
        taken.append(await queue.next_job())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(take)
            await anyio.wait_all_tasks_blocked()
            job = queued_job(queue, 1, delivered)  # wakes the first to wait: wait()
    assert woken == [True] and taken == [job]
    assert counts(queue) == (1, 0, 0, 0)
    queued_job(queue, 1, delivered)
    with anyio.fail_after(10):
        await queue.next_job(take=False)  # a job is there: no wait
    assert counts(queue) == (2, 0, 0, 0)  # and none taken


def test_a_job_changes_state_only_from_the_states_it_may_leave() -> None:
    job = Job(0, 1, lambda _: None)
    job.assign(FakeSlot(), 1)
    with pytest.raises(AssertionError):
        job.assign(FakeSlot(), 1)
    failed = Job.failed(3, ValueError("no"), lambda _: None)
    assert failed.done and failed.withdraw() == 0
    with pytest.raises(AssertionError):
        failed.requeue()


def test_the_message_tags_live_in_the_protocol_module_alone() -> None:
    """Both sides take the tags from ``_pool.protocol``, which imports nothing (a worker
    that imports it loads nothing more); no other pool module spells a tag out."""
    folder = Path(protocol.__file__).parent
    tree = ast.parse(Path(protocol.__file__).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert [ast.unparse(n) for n in imports] == ["from __future__ import annotations"]
    tags = {getattr(protocol, name) for name in protocol.__all__}
    assert tags == {"ready", "init-failed", "batch", "ok", "failed"}
    for path in sorted(folder.glob("*.py")):
        if path.name == "protocol.py":
            continue
        tree = ast.parse(path.read_text())
        # A tag stands first in a message, or is compared with a message's first item.
        places = [
            node.elts[0] for node in ast.walk(tree) if isinstance(node, ast.Tuple) and node.elts
        ]
        places += [
            side
            for node in ast.walk(tree)
            if isinstance(node, ast.Compare)
            for side in [node.left, *node.comparators]
        ]
        spelled = [
            f"{path.name}:{node.lineno}: {node.value!r}"
            for node in places
            if isinstance(node, ast.Constant) and node.value in tags
        ]
        assert not spelled, spelled
