"""Cross-rank agreement on what a collective is about to do.

Ranks that enter a collective with different shapes, dtypes or ops either hang
or silently return garbage. Before reducing, every rank hashes its description;
one small Allreduce tells whether all agree, and only on disagreement is the full
description gathered, so that every rank raises the same readable error.
"""

from __future__ import annotations

import hashlib

import numpy as np


class CollectiveMismatchError(RuntimeError):
    """Ranks called the same collective with different shapes, dtypes, ops or roots."""


def describe(**fields) -> str:
    """A canonical one-line description of a collective call on this rank."""
    return " ".join(f"{key}={value}" for key, value in fields.items())


def _digest(text: str) -> int:
    """63-bit hash, so that its negation fits in int64."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def verify_same(comm, collective: str, description: str) -> None:
    """Raise CollectiveMismatchError on every rank unless all ranks pass the same description."""
    from mpi4py import MPI

    h = _digest(description)
    agreed = np.empty(2, np.int64)
    # max(h) == -max(-h) == min(h) exactly when every rank holds the same h; every
    # rank sees the same answer, so all take the same branch below.
    comm.Allreduce(np.array([h, -h], np.int64), agreed, op=MPI.MAX)
    if agreed[0] == -agreed[1]:
        return
    raise CollectiveMismatchError(mismatch_message(collective, comm.allgather(description)))


def raise_if_any(comm, problem: str | None, error_type) -> None:
    """Collective: if any rank reports a problem, every rank raises error_type(first problem).

    For failures that only some ranks see (a file one rank cannot read): without this,
    the others would walk into the next collective and wait forever.
    """
    problems = [p for p in comm.allgather(problem) if p]
    if problems:
        raise error_type(problems[0])


def mismatch_message(collective: str, descriptions: list[str]) -> str:
    """Group ranks by what they passed: 'ranks 0,2: shape=(4,) ...; rank 1: shape=(5,) ...'."""
    by_description: dict[str, list[int]] = {}
    for rank, text in enumerate(descriptions):
        by_description.setdefault(text, []).append(rank)
    parts = []
    for text, ranks in by_description.items():
        label = "rank" if len(ranks) == 1 else "ranks"
        parts.append(f"{label} {','.join(map(str, ranks))}: {text}")
    return f"{collective}: ranks disagree on the call: " + "; ".join(parts)


def verify_same_items(comm, what: str, items: list[str]) -> None:
    """Raise CollectiveMismatchError on every rank unless all ranks pass the same list, naming the
    first position where a rank differs from rank 0 (a model's parameters, say)."""
    try:
        verify_same(comm, what, "\n".join(items))
    except CollectiveMismatchError:
        every = comm.allgather(items)
        for position in range(max(map(len, every))):
            seen = [rank_items[position] if position < len(rank_items) else "nothing" for rank_items in every]
            differing = [r for r, item in enumerate(seen) if item != seen[0]]
            if differing:
                raise CollectiveMismatchError(
                    f"{what}: ranks disagree at #{position}: rank 0 has {seen[0]}, "
                    + "; ".join(f"rank {r} has {seen[r]}" for r in differing)) from None
        raise
