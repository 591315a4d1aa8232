"""Random streams derived from (run seed, counter): the same keys always give the same stream."""

from __future__ import annotations

import hashlib

import numpy as np


def stream(seed: int, *keys: object) -> np.random.Generator:
    """A numpy Generator for ``seed`` and ``keys`` (e.g. ('m2n2', ask_id)); independent across keys."""
    digest = hashlib.sha256(repr((int(seed), *map(str, keys))).encode()).digest()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(digest[:16]))))


def derived_seed(seed: int, *keys: object) -> int:
    """A 32-bit seed derived from ``seed`` and ``keys`` (for libraries that take an int seed)."""
    digest = hashlib.sha256(repr((int(seed), *map(str, keys))).encode()).digest()
    return int.from_bytes(digest[:4], "little") or 1
