"""Seed mixing: the one place that turns tuples of integers into seeds.

Exact resume and the sample order depend on these values, so each function reproduces, bit for bit,
the formula it replaced (the tests compare against earlier runs):

    splitmix64(x)        one round of SplitMix64 - the counter-based variant draw (``schedule``)
    seed_sequence(*p)    numpy SeedSequence of the low 32 bits of every part (``degrade``)
    mix_seed(*p)         a 63-bit seed from a SeedSequence (paired loaders, torch generators)
    seed32(*p)           a 31-bit seed from a SeedSequence (DALI pipelines and readers)
"""
from __future__ import annotations

import numpy as np


MASK64 = (1 << 64) - 1
_LOW32 = 0xFFFFFFFF


def splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele, Lea & Flood 2014): a stable 64-bit mixing function."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def seed_sequence(*parts: int) -> np.random.SeedSequence:
    """A numpy SeedSequence from integers (each reduced to its low 32 bits)."""
    return np.random.SeedSequence([int(p) & _LOW32 for p in parts])


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence does the mixing)."""
    state = seed_sequence(*parts).generate_state(2, np.uint64)[0]
    return int(state & np.uint64(0x7FFFFFFFFFFFFFFF))


def seed32(*parts: int) -> int:
    """A 31-bit seed from integers (what DALI's ``seed`` arguments accept)."""
    return int(seed_sequence(*parts).generate_state(1)[0] & 0x7FFFFFFF)
