"""xent: fused cross-entropy and KL divergence over huge ``[rows, vocab]`` logits.

On the GPU (WGSL compute shaders through wgpu: Vulkan, Metal, DX12) or a fast multi-threaded CPU
path, over float32, float16 and bfloat16 logits read in place. The same Rust library as the
``xent`` command line tool, whose JSON summaries it reads and writes.

- :func:`score`: per-row nll, lse, argmax and correctness of in-memory arrays, and their summary.
- :func:`score_files`: ``xent score`` over .npy / .safetensors shards, in bounded memory.
- :func:`kld`, :func:`kld_files`: KL divergence of a test model from a base, llama.cpp's statistics.
- :class:`Summary`, :class:`KldSummary`: exact, mergeable, picklable summaries; :func:`merge`.
- :func:`cross_entropy`: the training loss (torch's options, z-loss, soft-cap) and its gradient,
  written over the logits or into a new array.
"""

from __future__ import annotations

from typing import Iterable, TypeVar, Union

from ._xent import (
    FilesResult,
    KldResult,
    KldSummary,
    ScoreResult,
    Summary,
    __version__,
    cross_entropy,
    kld,
    kld_files,
    score,
    score_files,
)

__all__ = [
    "FilesResult",
    "KldResult",
    "KldSummary",
    "ScoreResult",
    "Summary",
    "__version__",
    "cross_entropy",
    "kld",
    "kld_files",
    "merge",
    "score",
    "score_files",
]

_S = TypeVar("_S", Summary, KldSummary)


def merge(summaries: Iterable[_S]) -> _S:
    """Merges summaries of shards scored apart into the summary of one run, exactly.

    All must be :class:`Summary` objects, or all :class:`KldSummary` objects (``TypeError``
    otherwise); an empty list is a ``ValueError``. The result's ``device`` is ``"merged"`` (as
    ``xent merge`` writes it) and its ``seconds`` the sum of theirs.
    """
    items = list(summaries)
    if not items:
        raise ValueError("merge: no summaries given")
    kinds = {type(s) for s in items}
    if not kinds <= {Summary, KldSummary} or len(kinds) > 1:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise TypeError(f"merge: summaries must be all xent.Summary or all xent.KldSummary, got {names}")
    total: Union[Summary, KldSummary] = items[0]
    for s in items[1:]:
        total = total + s
    return total  # type: ignore[return-value]
