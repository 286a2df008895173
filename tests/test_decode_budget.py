"""The byte budget for images decoded at once (issue 29: bounded memory under concurrent large decodes)."""

from __future__ import annotations

import threading

from mmoffload.inference.decode_budget import DECODE_BYTES_PER_PIXEL, DecodeBudget, decode_cost


def wait_until(condition: object) -> None:
    while not condition():  # type: ignore[operator]
        threading.Event().wait(0.01)


def test_a_decode_that_does_not_fit_waits_for_room() -> None:
    budget = DecodeBudget(10)
    release, order = threading.Event(), []

    def first() -> None:
        with budget.hold(6):
            order.append("first in")
            release.wait(5)
        order.append("first out")

    def second() -> None:
        with budget.hold(6):
            order.append("second in")

    threads = [threading.Thread(target=first)]
    threads[0].start()
    wait_until(lambda: budget.in_flight == 6)
    threads.append(threading.Thread(target=second))
    threads[1].start()
    wait_until(lambda: budget.queued == 1)
    assert order == ["first in"] and budget.in_flight == 6
    release.set()
    for thread in threads:
        thread.join()
    assert order == ["first in", "first out", "second in"]
    assert (budget.peak, budget.waits, budget.in_flight) == (6, 1, 0)


def test_decodes_that_fit_together_run_together() -> None:
    budget = DecodeBudget(10)
    with budget.hold(4), budget.hold(6):
        assert budget.in_flight == 10
    assert (budget.peak, budget.waits) == (10, 0)


def test_one_image_over_the_budget_runs_alone() -> None:
    budget = DecodeBudget(4)
    with budget.hold(10):
        assert budget.in_flight == 10
    assert budget.in_flight == 0


def test_waiters_are_served_in_arrival_order() -> None:
    # A large decode is not passed over by smaller ones that arrive after it.
    budget = DecodeBudget(10)
    release, order = threading.Event(), []

    def hold(nbytes: int, name: str, until: threading.Event | None = None) -> None:
        with budget.hold(nbytes):
            order.append(name)
            if until is not None:
                until.wait(5)

    first = threading.Thread(target=hold, args=(6, "first", release))
    first.start()
    wait_until(lambda: budget.in_flight == 6)
    large = threading.Thread(target=hold, args=(10, "large"))
    large.start()
    wait_until(lambda: budget.queued == 1)
    small = threading.Thread(target=hold, args=(2, "small"))
    small.start()
    wait_until(lambda: budget.queued == 2)
    release.set()
    for thread in (first, large, small):
        thread.join()
    assert order == ["first", "large", "small"]


def test_the_cost_is_the_declared_pixels_times_the_measured_bytes_per_pixel() -> None:
    assert decode_cost(8000, 8000) == 8000 * 8000 * DECODE_BYTES_PER_PIXEL == 1_024_000_000
