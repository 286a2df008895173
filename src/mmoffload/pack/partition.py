"""Micro batches to ranks: Karmarkar-Karp, then swap refinement (packing.md section 5)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from mmoffload.errors import UsageError
from mmoffload.pack.options import Balance


def partition(weights: Sequence[float], world_size: int, balance: Balance = "prime-rl") -> list[list[int]]:
    """Partition item indices into ``world_size`` equal-count ranks of near-equal total weight.

    ``"prime-rl"`` is packing.md section 5's exact algorithm: Karmarkar-Karp largest
    differencing, then pairwise swap refinement. ``"best"`` also refines a longest-first
    greedy dealing and keeps whichever has the smaller ``(max load, max - min load)``,
    ties to the exact one, so its busiest rank is never heavier.

    Args:
        weights: the cost of each item; their number must be a multiple of ``world_size``.
        world_size: number of ranks.
        balance: which partition to return.

    Returns:
        The item indices of each rank in section 5's order: ascending after Karmarkar-Karp
        (or in dealing order for the greedy partition), then changed in place by the swaps,
        never re-sorted (prime-rl's ``_refine_by_swapping`` does not sort either).
    """
    if len(weights) % world_size:
        raise UsageError(f"Expected a multiple of {world_size} items to partition, got {len(weights)}")
    if not weights:
        return [[] for _ in range(world_size)]
    ranks = _refine(weights, _karmarkar_karp(weights, world_size))
    if balance == "best":
        greedy = _refine(weights, _greedy(weights, world_size))
        if _score(weights, greedy) < _score(weights, ranks):
            ranks = greedy
    return ranks


class _KKState:
    """Karmarkar-Karp: W sets of ``(total, items)``, kept sorted descending; states order by spread."""

    __slots__ = ("sets", "spread")

    def __init__(self, sets: list[tuple[float, list[int]]]) -> None:
        self.sets = sorted(sets, reverse=True)
        self.spread = self.sets[0][0] - self.sets[-1][0]

    def __lt__(self, other: _KKState) -> bool:
        # heapq pops the smallest: the largest spread, ties to the larger first set.
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.sets[0] > other.sets[0]

    def merge(self, other: _KKState) -> _KKState:
        """Return the state where set i of this one gains set W-1-i of ``other``."""
        w = len(self.sets)
        return _KKState(
            [
                (total + other.sets[w - 1 - i][0], items + other.sets[w - 1 - i][1])
                for i, (total, items) in enumerate(self.sets)
            ]
        )


def _karmarkar_karp(weights: Sequence[float], world_size: int) -> list[list[int]]:
    """Largest differencing over chunks of W items taken in ascending ``(weight, index)`` order."""
    ordered = sorted((weight, index) for index, weight in enumerate(weights))
    states = [
        _KKState([(weight, [index]) for weight, index in ordered[start : start + world_size]])
        for start in range(0, len(ordered), world_size)
    ]
    heapq.heapify(states)
    while len(states) > 1:
        first = heapq.heappop(states)
        heapq.heappush(states, first.merge(heapq.heappop(states)))
    return [sorted(items) for _, items in states[0].sets]


def _greedy(weights: Sequence[float], world_size: int) -> list[list[int]]:
    """Deal items heaviest first to the lightest rank that still has room (equal counts)."""
    per_rank = len(weights) // world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for index in sorted(range(len(weights)), key=lambda i: weights[i], reverse=True):
        rank = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=loads.__getitem__)
        ranks[rank].append(index)
        loads[rank] += weights[index]
    return ranks


def _score(weights: Sequence[float], ranks: list[list[int]]) -> tuple[float, float]:
    loads = [sum(weights[index] for index in items) for items in ranks]
    return max(loads), max(loads) - min(loads)


def _refine(weights: Sequence[float], ranks: list[list[int]]) -> list[list[int]]:
    """Apply the best strictly improving swap of two items between two ranks until none is left.

    A swap is scored by the new ``(max load, max - min load)``; the first best one in
    the order (rank l < rank r, item of l, item of r) wins. A swapped item takes the
    place of the one it replaced. Each pair of ranks is scored with numpy over all its
    item pairs at once, with the same float operations in the same order as one at a
    time, so the result is exact (the scan is quadratic in items per rank).
    """
    ranks = [list(items) for items in ranks]
    values = np.asarray(weights)
    loads = [sum(weights[index] for index in items) for items in ranks]
    world_size = len(ranks)
    while True:
        best = (max(loads), max(loads) - min(loads))
        swap: tuple[int, int, int, int, float, float] | None = None
        by_load = sorted(range(world_size), key=loads.__getitem__)
        for left in range(world_size):
            for right in range(left + 1, world_size):
                others = [rank for rank in by_load if rank != left and rank != right]
                left_weights = values[ranks[left]][:, None]
                right_weights = values[ranks[right]][None, :]
                new_left = (loads[left] - left_weights) + right_weights
                new_right = (loads[right] - right_weights) + left_weights
                high = np.maximum(new_left, new_right)
                low = np.minimum(new_left, new_right)
                if others:
                    high = np.maximum(high, loads[others[-1]])
                    low = np.minimum(low, loads[others[0]])
                top = high.min()
                if top > best[0]:
                    continue
                spread = np.where(high == top, high - low, np.inf)
                least = spread.min()
                if (top, least) < best:
                    flat = int(np.flatnonzero(spread == least)[0])
                    i, j = divmod(flat, len(ranks[right]))
                    best = (top, least)
                    swap = (left, right, i, j, new_left[i, j].item(), new_right[i, j].item())
        if swap is None:
            return ranks
        left, right, i, j, loads[left], loads[right] = swap
        ranks[left][i], ranks[right][j] = ranks[right][j], ranks[left][i]
