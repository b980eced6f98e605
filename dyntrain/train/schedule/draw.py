"""The variant draw: which DyNet variant trains at each global iteration, as pure functions.

The variant of global iteration ``t`` is a pure function of ``(seed, t, probs)``:

    u = uniform53(splitmix64(splitmix64(seed) XOR t))        # counter-based, no state
    variant = first name n (in sorted order) with u < cumsum(probs normalised)[n]

Every rank evaluates the same function, so all ranks agree without communication, a resumed run
draws the same sequence, and the draw of step 10**6 costs as little as the draw of step 0. Python's
``hash()`` is never used (it is salted per process). Any number of variants works; a variant with
probability 0 is never drawn.

Cost-aware probabilities: a ``ProbabilityTable`` of ``(from_step, probs)`` entries, uniform (or the
configured probabilities) from step 0; ``set(step, probs)`` adds an entry (the cost-aware draw does
so after each validation, from figures that are the same on every rank). The draw of step t uses the
newest entry with from_step <= t, so it is a pure function of (seed, t, the table); the table is
saved with checkpoints (``state_dict``) and restored on resume.
"""
from __future__ import annotations

from bisect import bisect_right
from operator import itemgetter
from typing import Any, Mapping, Sequence

from dyntrain.seeds import splitmix64  # noqa: F401 - re-exported: the variant draw's mixing function


_MASK64 = (1 << 64) - 1
Cumulative = list[tuple[float, str]]


def uniform_at(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step)."""
    h = splitmix64(splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


def cumulative(names: Sequence[str], probs: Mapping[str, float]) -> Cumulative:
    """(running sum, name) over the names with a positive probability, in ``names`` order."""
    out, acc = [], 0.0
    for n in names:
        if probs.get(n, 0.0) > 0:
            acc += probs[n]
            out.append((acc, n))
    return out


def draw(seed: int, step: int, cum: Cumulative) -> str:
    """The variant of ``step`` under the cumulative probabilities ``cum``."""
    u = uniform_at(seed, step)
    for c, name in cum:
        if u < c:
            return name
    return cum[-1][1]  # u within rounding of 1.0


def normalised(names: Sequence[str], probs: Mapping[str, float]) -> dict[str, float]:
    """``probs`` over ``names`` summing to 1 (names missing from ``probs`` get 0)."""
    total = float(sum(probs.values()))
    if total <= 0 or any(p < 0 for p in probs.values()) or set(probs) - set(names):
        raise ValueError(f"variant probabilities: need non-negative weights with a positive sum over "
                         f"{list(names)}, got {dict(probs)}")
    return {n: float(probs.get(n, 0.0)) / total for n in names}


class ProbabilityTable:
    """``(from_step, probs)`` entries; ``at(step)`` is the newest entry with from_step <= step."""

    def __init__(self, names: Sequence[str], initial: Mapping[str, float]) -> None:
        self.names = list(names)
        self._table: list[tuple[int, dict[str, float]]] = [(0, dict(initial))]
        self._cum: list[Cumulative] = [cumulative(self.names, initial)]

    def _entry(self, step: int) -> int:
        return bisect_right(self._table, step, key=itemgetter(0)) - 1

    def at(self, step: int) -> dict[str, float]:
        """The probabilities the draw of ``step`` uses."""
        return dict(self._table[self._entry(step)][1])

    def cumulative_at(self, step: int) -> Cumulative:
        return self._cum[self._entry(step)]

    @property
    def latest(self) -> dict[str, float]:
        return dict(self._table[-1][1])

    def set(self, step: int, probs: Mapping[str, float]) -> dict[str, float]:
        """From ``step`` on, draw with ``probs`` (normalised; entries from ``step`` on are replaced).
        Returns the normalised probabilities."""
        clean = normalised(self.names, probs)
        while self._table and self._table[-1][0] >= step and len(self._table) > 1:
            self._table.pop()
            self._cum.pop()
        if self._table[-1][0] == step:  # step 0: replace the initial entry
            self._table[-1], self._cum[-1] = (step, clean), cumulative(self.names, clean)
        else:
            self._table.append((int(step), clean))
            self._cum.append(cumulative(self.names, clean))
        return clean

    def state_dict(self) -> dict[str, Any]:
        return {"table": [[s, dict(p)] for s, p in self._table]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        table = state.get("table") or []
        if not table:
            return
        self._table = [(int(s), {n: float(p.get(n, 0.0)) for n in self.names}) for s, p in table]
        self._cum = [cumulative(self.names, p) for _, p in self._table]
