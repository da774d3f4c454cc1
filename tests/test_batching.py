"""The dynamic batcher's ordering: length-sorted ERNIE batches, one-width OCR batches.

The real :class:`models.batching.DynamicBatcher` on a real event loop and thread pool;
``run_batch`` records what each batch held, so the tests see exactly how waiting items were
cut into batches.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from models.batching import DynamicBatcher


class Recorder:
    """A run_batch that remembers every batch and can hold the first one back."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.first_started = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        if not self.batches:
            self.first_started.set()
            self.release.wait(10)
        self.batches.append(list(items))
        return [item * 10 for item in items]


async def _fill_while_busy(batcher: DynamicBatcher, recorder: Recorder, items: list[int]) -> list:
    """Occupy the batcher with one item, queue ``items`` behind it, then let it go: the
    queued items are all waiting when the collector next gathers."""
    first = asyncio.ensure_future(batcher.submit(-1))
    await asyncio.to_thread(recorder.first_started.wait, 10)
    waiting = [asyncio.ensure_future(batcher.submit(item)) for item in items]
    await asyncio.sleep(0.05)  # every submit is queued (no timing is asserted)
    recorder.release.set()
    results = await asyncio.gather(first, *waiting)
    await batcher.aclose()
    return results


async def test_sort_key_cuts_waiting_items_into_length_ordered_batches() -> None:
    recorder = Recorder()
    with ThreadPoolExecutor(2) as pool:
        batcher = DynamicBatcher(recorder, max_batch_size=3, max_wait_ms=1, executor=pool,
                                 sort_key=lambda n: n, sort_window=4)
        lengths = [50, 3, 48, 2, 49, 4, 1, 51, 5]
        results = await _fill_while_busy(batcher, recorder, lengths)
    assert results == [-10, *(n * 10 for n in lengths)]  # each caller gets its own answer
    assert recorder.batches[1:] == [[1, 2, 3], [4, 5, 48], [49, 50, 51]]


async def test_without_a_key_batches_keep_arrival_order() -> None:
    recorder = Recorder()
    with ThreadPoolExecutor(2) as pool:
        batcher = DynamicBatcher(recorder, max_batch_size=3, max_wait_ms=1, executor=pool)
        await _fill_while_busy(batcher, recorder, [50, 3, 48, 2, 49, 4])
    assert recorder.batches[1:] == [[50, 3, 48], [2, 49, 4]]


async def test_split_by_key_never_mixes_keys_in_a_batch() -> None:
    recorder = Recorder()
    width = {-1: 320, 1: 320, 2: 336, 3: 320, 4: 320, 5: 336, 6: 320, 7: 320}
    with ThreadPoolExecutor(2) as pool:
        batcher = DynamicBatcher(recorder, max_batch_size=3, max_wait_ms=1, executor=pool,
                                 sort_key=width.__getitem__, sort_window=8, split_by_key=True)
        await _fill_while_busy(batcher, recorder, [n for n in width if n > 0])
    assert recorder.batches[1:] == [[1, 3, 4], [6, 7], [2, 5]]
    for batch in recorder.batches[1:]:
        assert len({width[i] for i in batch}) == 1


async def test_more_coming_false_runs_at_once_true_waits_to_fill() -> None:
    expected = {"more": False}
    recorder = Recorder()
    recorder.release.set()
    with ThreadPoolExecutor(2) as pool:
        # A long wait: with nobody coming the lone item must not sit out the 10 s.
        batcher = DynamicBatcher(recorder, max_batch_size=4, max_wait_ms=10_000, executor=pool,
                                 more_coming=lambda: expected["more"])
        assert await asyncio.wait_for(batcher.submit(7), 5) == 70
        expected["more"] = True
        late = asyncio.ensure_future(batcher.submit(8))
        await asyncio.sleep(0.05)
        assert not late.done()  # someone is on the way: the batch waits to fill
        rest = [asyncio.ensure_future(batcher.submit(n)) for n in (9, 10, 11)]
        assert await asyncio.wait_for(asyncio.gather(late, *rest), 5) == [80, 90, 100, 110]
        await batcher.aclose()
    assert recorder.batches == [[7], [8, 9, 10, 11]]


async def test_a_failing_sort_key_fails_its_callers_and_the_batcher_lives_on() -> None:
    recorder = Recorder()
    recorder.release.set()
    with ThreadPoolExecutor(2) as pool:
        batcher = DynamicBatcher(recorder, max_batch_size=2, max_wait_ms=1, executor=pool,
                                 sort_key=lambda n: 100 // n)
        try:
            await asyncio.wait_for(batcher.submit(0), 5)
        except ZeroDivisionError:
            pass
        else:
            raise AssertionError("the sort key's error did not reach its caller")
        assert await asyncio.wait_for(batcher.submit(4), 5) == 40
        await batcher.aclose()
