"""Adaptive batching: concurrent requests share model passes, and one failing request fails alone."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.batching import ContinuousBatcher


class RecordingModel:
    """Squares numbers; records each pass, and can hold a pass until released."""

    def __init__(self, fail_on: int | None = None):
        self.passes: list[list[int]] = []
        self.attention: list[bool] = []
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()
        self.threads: set[int] = set()

    def __call__(self, items: list[int], return_attention: bool) -> tuple[list[int], float, float]:
        self.gate.wait(timeout=10)
        self.threads.add(threading.get_ident())
        self.passes.append(list(items))
        self.attention.append(return_attention)
        if self.fail_on in items:
            raise ValueError(f"cannot square {self.fail_on}")
        return [item * item for item in items], 0.001, 0.002


def test_a_lone_request_runs_at_once_in_its_own_pass():
    model = RecordingModel()
    outcome = asyncio.run(ContinuousBatcher(model, max_cases=8).submit([3]))
    assert outcome.results == [9]
    assert outcome.batch_cases == 1
    assert (outcome.preparing, outcome.forward) == (0.001, 0.002)
    assert model.passes == [[3]]


def test_requests_queued_during_a_pass_share_the_next_one_up_to_max_cases():
    model = RecordingModel()
    batcher = ContinuousBatcher(model, max_cases=4)

    async def scenario():
        model.gate.clear()  # the first pass blocks until the others have queued
        first = asyncio.create_task(batcher.submit([0]))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.submit([value])) for value in range(1, 7)]
        await asyncio.sleep(0.05)
        model.gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(scenario())
    assert model.passes == [[0], [1, 2, 3, 4], [5, 6]]
    assert [outcome.results for outcome in rest] == [[v * v] for v in range(1, 7)]
    assert [outcome.batch_cases for outcome in rest] == [4, 4, 4, 4, 2, 2]
    assert first.batch_cases == 1


def test_a_multi_case_request_stays_whole_and_attention_is_computed_if_any_request_wants_it():
    model = RecordingModel()
    batcher = ContinuousBatcher(model, max_cases=4)

    async def scenario():
        model.gate.clear()
        blocker = asyncio.create_task(batcher.submit([9]))
        await asyncio.sleep(0.05)
        pair = asyncio.create_task(batcher.submit([1, 2], return_attention=True))
        triple = asyncio.create_task(batcher.submit([3, 4, 5]))  # would exceed 4 with the pair
        await asyncio.sleep(0.05)
        model.gate.set()
        return await blocker, await pair, await triple

    _, pair, triple = asyncio.run(scenario())
    assert model.passes == [[9], [1, 2], [3, 4, 5]]
    assert model.attention == [False, True, False]
    assert (pair.results, triple.results) == ([1, 4], [9, 16, 25])


def test_a_failing_request_fails_alone_and_the_others_are_answered():
    model = RecordingModel(fail_on=2)
    batcher = ContinuousBatcher(model, max_cases=8)

    async def scenario():
        model.gate.clear()
        blocker = asyncio.create_task(batcher.submit([0]))
        await asyncio.sleep(0.05)
        tasks = [asyncio.create_task(batcher.submit([value])) for value in (1, 2, 3)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await blocker
        return await asyncio.gather(*tasks, return_exceptions=True)

    one, two, three = asyncio.run(scenario())
    assert one.results == [1] and three.results == [9]
    assert isinstance(two, ValueError) and "cannot square 2" in str(two)
    assert model.passes == [[0], [1, 2, 3], [1], [2], [3]]  # the merged pass failed, then one by one


def test_inline_passes_run_on_the_event_loop_and_merge_the_requests_of_one_turn():
    model = RecordingModel()
    batcher = ContinuousBatcher(model, max_cases=4, inline=lambda items: True)

    async def scenario():
        outcomes = await asyncio.gather(*(batcher.submit([value]) for value in range(6)))
        return threading.get_ident(), outcomes

    loop_thread, outcomes = asyncio.run(scenario())
    assert model.passes == [[0, 1, 2, 3], [4, 5]]
    assert model.threads == {loop_thread}
    assert [outcome.results for outcome in outcomes] == [[v * v] for v in range(6)]
    assert [outcome.batch_cases for outcome in outcomes] == [4, 4, 4, 4, 2, 2]


def test_each_pass_runs_inline_or_in_the_model_thread_as_the_predicate_says():
    model = RecordingModel()
    batcher = ContinuousBatcher(model, max_cases=4, inline=lambda items: sum(items) < 10)
    threads = []

    async def scenario():
        for value in (1, 20):
            before = set(model.threads)
            await batcher.submit([value])
            threads.append((set(model.threads) - before).pop())
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert threads[0] == loop_thread  # small pass: on the event loop
    assert threads[1] != loop_thread  # big pass: in the model thread


def test_an_inline_failing_request_fails_alone():
    model = RecordingModel(fail_on=2)
    batcher = ContinuousBatcher(model, max_cases=8, inline=lambda items: True)

    async def scenario():
        return await asyncio.gather(*(batcher.submit([value]) for value in (1, 2, 3)), return_exceptions=True)

    one, two, three = asyncio.run(scenario())
    assert one.results == [1] and three.results == [9]
    assert isinstance(two, ValueError) and "cannot square 2" in str(two)
    assert model.passes == [[1, 2, 3], [1], [2], [3]]


def test_requests_join_a_pass_only_while_the_pass_fits():
    model = RecordingModel()
    batcher = ContinuousBatcher(
        model, max_cases=8, fits=lambda items: sum(items) <= 10, inline=lambda items: True
    )

    async def scenario():
        await asyncio.gather(*(batcher.submit([value]) for value in (6, 3, 5, 1, 4)))
        await batcher.submit([20])  # too big for any pass, and alone it still runs

    asyncio.run(scenario())
    assert model.passes == [[6, 3], [5, 1, 4], [20]]


def test_a_request_too_large_for_one_pass_runs_in_several_and_queued_requests_go_in_between():
    model = RecordingModel()
    batcher = ContinuousBatcher(model, max_cases=4, fits=lambda items: sum(items) <= 10)

    async def scenario():
        model.gate.clear()
        blocker = asyncio.create_task(batcher.submit([0]))
        await asyncio.sleep(0.05)
        large = asyncio.create_task(batcher.submit([1, 1, 1, 1, 1, 6, 5, 20, 2], return_attention=True))
        await asyncio.sleep(0.05)
        single = asyncio.create_task(batcher.submit([3]))
        await asyncio.sleep(0.05)
        model.gate.set()
        return await blocker, await large, await single

    _, large, single = asyncio.run(scenario())
    # four cases at most, the sum at most 10, at least one case: and the single request right after
    # the large one's first pass, not after its last
    assert model.passes == [[0], [1, 1, 1, 1], [3], [1, 6], [5], [20], [2]]
    assert model.attention == [False, True, False, True, True, True, True]
    assert large.results == [1, 1, 1, 1, 1, 36, 25, 400, 4]
    assert large.batch_cases == 4
    assert (large.preparing, large.forward) == pytest.approx((0.005, 0.010))
    assert single.results == [9] and single.batch_cases == 1


def test_a_failing_pass_of_a_split_request_fails_the_request_once():
    model = RecordingModel(fail_on=7)
    batcher = ContinuousBatcher(model, max_cases=2)

    async def scenario():
        return await asyncio.gather(
            batcher.submit([1, 2, 7, 4, 5]), batcher.submit([6]), return_exceptions=True
        )

    failed, other = asyncio.run(scenario())
    assert isinstance(failed, ValueError) and "cannot square 7" in str(failed)
    assert other.results == [36]
    assert [7, 4] in model.passes and [5] not in model.passes  # nothing runs for a failed request


def test_max_cases_must_be_positive():
    with pytest.raises(ValueError, match="max_cases must be at least 1"):
        ContinuousBatcher(RecordingModel(), max_cases=0)
