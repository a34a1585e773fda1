"""xent: fused cross-entropy and KL divergence over huge [rows, vocab] logits (GPU through wgpu, or a fast CPU path)."""

from __future__ import annotations

import os
from typing import Any, Iterable, Literal, Sequence, Union, overload

import numpy as np
import numpy.typing as npt

__version__: str

#: A path, a glob ("shards/*.npy"), a directory (its .npy/.safetensors files, sorted by name), or a list of them.
Paths = Union[str, os.PathLike[str], Sequence[Union[str, os.PathLike[str]]]]
Device = Literal["auto", "gpu", "cpu"]

class Summary:
    """Mergeable sums of a scoring run: the same object as ``xent score --summary-out`` writes.

    ``a + b`` and :func:`merge` are exact (integer sums), so shards scored anywhere merge to the
    one-run result to the last digit. Picklable; ``to_json``/``from_json`` round-trip the CLI's JSON.
    """

    tokens: int
    ignored: int
    correct: int
    nan: int
    infinite: int
    mean_nll: float
    perplexity: float
    ppl_stderr: float
    bits_per_token: float
    accuracy: float
    device: str
    seconds: float
    def __init__(self) -> None: ...
    def to_dict(self) -> dict[str, Any]: ...
    def to_json(self) -> str: ...
    @staticmethod
    def from_json(text: str | bytes) -> Summary: ...
    def __add__(self, other: Summary) -> Summary: ...
    def __radd__(self, other: Summary | Literal[0]) -> Summary: ...
    def __eq__(self, other: object) -> bool: ...

class KldSummary:
    """llama.cpp's KL-divergence statistics, mergeable (exact sums, merged percentile sketches)."""

    tokens: int
    ignored: int
    kld_mean: float
    kld_stderr: float
    kld_max: float
    kld_median: float
    kld_min: float
    same_top: float
    same_top_stderr: float
    device: str
    seconds: float
    def report(self) -> dict[str, Any]:
        """The statistics ``xent kld --json`` prints."""
    def to_dict(self) -> dict[str, Any]: ...
    def to_json(self) -> str: ...
    @staticmethod
    def from_json(text: str | bytes) -> KldSummary: ...
    def __add__(self, other: KldSummary) -> KldSummary: ...
    def __radd__(self, other: KldSummary | Literal[0]) -> KldSummary: ...
    def __getattr__(self, name: str) -> Any: ...

class ScoreResult:
    """Per-row results of :func:`score`, flat over rows (``N = B * T`` for ``[B, T, V]`` logits)."""

    nll: npt.NDArray[np.float32]
    lse: npt.NDArray[np.float32]
    correct: npt.NDArray[np.bool_]
    argmax: npt.NDArray[np.int64]  # -1 for a row holding NaN or +inf
    summary: Summary
    device: str

class KldResult:
    """Per-row results of :func:`kld`; ``nll_base``, ``nll_test``, ``dp`` are ``None`` without targets."""

    kld: npt.NDArray[np.float32]
    same_top: npt.NDArray[np.bool_]
    nll_base: npt.NDArray[np.float32] | None
    nll_test: npt.NDArray[np.float32] | None
    dp: npt.NDArray[np.float32] | None
    summary: KldSummary
    device: str

class FilesResult:
    """What :func:`score_files` returns when per-token or per-sequence results are asked for."""

    summary: Summary
    nll: npt.NDArray[np.float32] | None
    lse: npt.NDArray[np.float32] | None
    correct: npt.NDArray[np.bool_] | None
    seq_tokens: npt.NDArray[np.int64] | None
    seq_sum_logprob: npt.NDArray[np.float64] | None
    seq_is_greedy: npt.NDArray[np.bool_] | None

# Errors: bad dtypes or objects raise TypeError; bad shapes, targets, file contents and summaries
# ValueError; missing or unreadable files OSError (FileNotFoundError); device failures
# RuntimeError; Ctrl-C KeyboardInterrupt. Every message is the one line the CLI prints.

def score(
    logits: Any,
    targets: Any,
    *,
    device: Device = "auto",
    ignore_index: int = -100,
) -> ScoreResult:
    """Cross-entropy of each row of ``logits`` against its target, read in place.

    ``logits``: a C-contiguous array ``[N, V]`` or ``[B, T, V]`` of float32, float16 or bfloat16
    (``ml_dtypes.bfloat16``): a numpy array, or any CPU tensor exporting DLPack (torch, JAX) or the
    buffer protocol; it is read where it lies, never copied. ``targets``: integers ``[N]`` or
    ``[B, T]`` (int64, int32, uint32, int16, uint16, int8, uint8). ``device``: ``"gpu"``, ``"cpu"``
    or ``"auto"`` (the GPU when a hardware adapter exists; said on stderr). The GIL is released
    while computing.
    """

@overload
def score_files(
    logits: Paths,
    targets: Paths,
    *,
    device: Device = "auto",
    ignore_index: int = -100,
    shift: bool = False,
    offsets: Paths | npt.ArrayLike | None = None,
    per_token: Literal[False] = False,
    per_sequence: Literal[False] = False,
    progress: bool = False,
    chunk_mib: int = 64,
    logits_key: str | None = None,
    targets_key: str | None = None,
) -> Summary: ...
@overload
def score_files(
    logits: Paths,
    targets: Paths,
    *,
    device: Device = "auto",
    ignore_index: int = -100,
    shift: bool = False,
    offsets: Paths | npt.ArrayLike | None = None,
    per_token: bool = False,
    per_sequence: bool = False,
    progress: bool = False,
    chunk_mib: int = 64,
    logits_key: str | None = None,
    targets_key: str | None = None,
) -> Summary | FilesResult: ...
def kld(
    base: Any,
    test: Any,
    targets: Any | None = None,
    *,
    device: Device = "auto",
    ignore_index: int = -100,
) -> KldResult:
    """KL divergence KL(base || test) of each row (both ``[N, V]`` or ``[B, T, V]``, any float
    dtype each), with llama.cpp's statistics in ``.summary``; with ``targets`` also both models'
    nll and Δp. Read in place like :func:`score`."""

def kld_files(
    base: Paths,
    test: Paths,
    targets: Paths | None = None,
    *,
    device: Device = "auto",
    ignore_index: int = -100,
    shift: bool = False,
    progress: bool = False,
    chunk_mib: int = 64,
) -> KldSummary:
    """``xent kld`` over files: shards of .npy/.safetensors logits, in bounded memory."""

def cross_entropy(
    logits: Any,
    targets: Any,
    *,
    weight: npt.ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    grad: Literal["inplace", "separate"] | None = None,
    device: Device = "auto",
) -> tuple[float | npt.NDArray[np.float32], Any]:
    """Training loss (PyTorch's F.cross_entropy, plus z_loss and softcap) and ``d loss / d logits``:
    ``grad=None`` computes none, ``"inplace"`` writes it over ``logits`` and returns that array,
    ``"separate"`` returns a new array of the logits' dtype. ``loss`` is a float for ``"mean"`` and
    ``"sum"``, a float32 array shaped like ``targets`` for ``"none"``."""

@overload
def merge(summaries: Iterable[Summary]) -> Summary: ...
@overload
def merge(summaries: Iterable[KldSummary]) -> KldSummary: ...
