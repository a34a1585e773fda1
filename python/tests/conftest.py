"""Shared helpers for the xent test suite: float64 references, tolerance checks, file writers and
the device parametrisation.

The references are plain numpy in float64 (max-subtracted log-softmax). Low-precision inputs are
converted to float64 from the very array given to xent, so both see the same rounded values.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import xent

# Tolerance of f32 results against the float64 reference: |got - want| <= ATOL + RTOL * |want|.
ATOL = 1e-5
RTOL = 1e-5
# Per-token KLD (the implementation's documented accuracy is 1e-7 + 1e-4 * kld).
KLD_ATOL = 1e-7
KLD_RTOL = 1e-4

SCALE = 2**64  # fixed-point scale of the exact sums in a Summary
DTYPES = {
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}
TARGET_DTYPES = [np.int64, np.int32, np.uint32, np.int16, np.uint16, np.int8, np.uint8]
GPU_MAX_ROWS = 64
GPU_MAX_VOCAB = 4096


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------

_GPU_STATE: dict[str, object] = {}


def gpu_required() -> bool:
    return os.environ.get("XENT_REQUIRE_GPU") == "1"


def gpu_problem() -> str | None:
    """None when device="gpu" works here; else why not (probed once per session)."""
    if "problem" not in _GPU_STATE:
        problem = None
        try:
            xent.score(np.zeros((1, 2), np.float32), np.zeros(1, np.int64), device="gpu")
        except RuntimeError as e:
            if "adapter" not in str(e).lower():
                raise
            problem = str(e)
        _GPU_STATE["problem"] = problem
    return _GPU_STATE["problem"]  # type: ignore[return-value]


def need_device(device: str) -> None:
    """Skips (or fails, under XENT_REQUIRE_GPU=1) a GPU test when no adapter exists."""
    if device != "gpu":
        return
    problem = gpu_problem()
    if problem is not None:
        if gpu_required():
            pytest.fail(f"XENT_REQUIRE_GPU=1 but device='gpu' fails: {problem}")
        pytest.skip(f"no GPU adapter ({problem}); install mesa-vulkan-drivers for lavapipe")


@pytest.fixture(params=["cpu", "gpu"])
def device(request) -> str:
    need_device(request.param)
    return request.param


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def make_logits(rng: np.random.Generator, shape, dtype: str = "f32", scale: float = 3.0) -> np.ndarray:
    """Random normal logits of `shape` in `dtype` ("f32", "f16", "bf16")."""
    x = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)
    return x.astype(DTYPES[dtype])


def make_targets(rng: np.random.Generator, shape, vocab: int, dtype=np.int64) -> np.ndarray:
    return rng.integers(0, vocab, size=shape).astype(dtype)


def as_f64(x) -> np.ndarray:
    """The exact float64 values of an f32 / f16 / bf16 array."""
    return np.asarray(x).astype(np.float32).astype(np.float64)


# --------------------------------------------------------------------------------------------
# References (float64)
# --------------------------------------------------------------------------------------------


def _rows(x) -> np.ndarray:
    x = as_f64(x)
    return x.reshape(-1, x.shape[-1])


def ref_log_softmax(x64: np.ndarray):
    """Row-wise log-softmax of [N, V] float64 values, with PyTorch's special-value semantics.

    Returns (logp [N, V], lse [N], argmax [N], ok [N]); `ok` is False for broken rows (a NaN or
    +inf anywhere, or only -inf), whose lse and logp are NaN and whose argmax is meaningless.
    """
    n, v = x64.shape
    broken = np.isnan(x64).any(axis=1) | (x64 == np.inf).any(axis=1)
    with np.errstate(all="ignore"):
        clean = np.where(np.isnan(x64), -np.inf, x64)
        m = clean.max(axis=1) if v else np.full(n, -np.inf)
        ok = ~broken & (m > -np.inf)
        msafe = np.where(ok, m, 0.0)
        z = x64 - msafe[:, None]
        log_s = np.log(np.exp(z).sum(axis=1))
        lse = np.where(ok, msafe + log_s, np.nan)
        logp = np.where(ok[:, None], z - log_s[:, None], np.nan)
    argmax = clean.argmax(axis=1) if v else np.zeros(n, np.int64)
    return logp, lse, argmax, ok


def ref_score(logits, targets, ignore_index: int = -100) -> dict:
    """The float64 reference of xent.score: nll, lse, argmax, correct, ignored, ok (per row)."""
    x = _rows(logits)
    n, v = x.shape
    t = np.asarray(targets).reshape(-1).astype(np.int64)
    assert t.shape == (n,)
    ignored = t == ignore_index
    logp, lse, argmax, ok = ref_log_softmax(x)
    tt = np.where(ignored, 0, t)
    rows = np.arange(n)
    nll = np.where(ignored, 0.0, -logp[rows, tt]) if n else np.zeros(0)
    # A -inf target logit in a healthy row: nll = +inf (not NaN).
    if n:
        xt = x[rows, tt]
        nll = np.where(~ignored & ok & (xt == -np.inf), np.inf, nll)
    correct = ~ignored & ok & (argmax == t)
    return {"nll": nll, "lse": lse, "argmax": argmax, "correct": correct, "ignored": ignored, "ok": ok}


def ref_kld(base, test, targets=None, ignore_index: int = -100) -> dict:
    """The float64 reference of xent.kld: kld, same_top, nll_base, nll_test, dp, ignored."""
    a, b = _rows(base), _rows(test)
    n, v = a.shape
    la, _, ama, oka = ref_log_softmax(a)
    lb, _, amb, okb = ref_log_softmax(b)
    ok = oka & okb
    if targets is None:
        ignored = np.zeros(n, bool)
    else:
        t = np.asarray(targets).reshape(-1).astype(np.int64)
        ignored = t == ignore_index
    with np.errstate(all="ignore"):
        p = np.exp(la)
        terms = np.where(p > 0, p * (la - lb), 0.0)
        kld = np.where(ok, terms.sum(axis=1), np.nan)
    kld = np.where(ignored, 0.0, kld)
    same_top = ok & ~ignored & (ama == amb)
    out = {"kld": kld, "same_top": same_top, "ignored": ignored}
    if targets is not None:
        tt = np.where(ignored, 0, t)
        rows = np.arange(n)
        nb = np.where(ignored, 0.0, -la[rows, tt])
        nt = np.where(ignored, 0.0, -lb[rows, tt])
        with np.errstate(all="ignore"):
            dp = np.where(ignored, 0.0, np.exp(-nt) - np.exp(-nb))
        out.update(nll_base=nb, nll_test=nt, dp=dp)
    return out


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def assert_close(got, want, atol: float = ATOL, rtol: float = RTOL, what: str = "value", mask=None) -> None:
    """Element-wise |got - want| <= atol + rtol*|want|; NaN matches NaN, inf the same inf."""
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    want = np.asarray(want, dtype=np.float64).reshape(-1)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    if mask is not None:
        mask = np.asarray(mask, bool).reshape(-1)
        idx = np.nonzero(mask)[0]
        got, want = got[mask], want[mask]
    else:
        idx = np.arange(got.size)
    gn, wn = np.isnan(got), np.isnan(want)
    bad = gn != wn
    gi, wi = np.isinf(got), np.isinf(want)
    bad |= (gi | wi) & ~(gn | wn) & (got != want)
    fin = ~(gn | wn | gi | wi)
    with np.errstate(all="ignore"):
        err = np.abs(got - want)
        bad |= fin & ~(err <= atol + rtol * np.abs(want))
    if bad.any():
        i = np.nonzero(bad)[0][0]
        rel = np.where(fin, err / (atol + rtol * np.abs(want)), 0)
        worst = int(np.argmax(rel)) if fin.any() else i
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.size} rows off; first row {idx[i]}: got {got[i]!r} "
            f"want {want[i]!r}; worst row {idx[worst]}: got {got[worst]!r} want {want[worst]!r}"
        )


def check_score(res, logits, targets, ignore_index: int = -100, atol: float = ATOL, rtol: float = RTOL) -> dict:
    """Checks a ScoreResult row by row, and its summary, against the float64 reference."""
    ref = ref_score(logits, targets, ignore_index)
    n = ref["nll"].shape[0]
    for name, dt in [("nll", np.float32), ("lse", np.float32), ("correct", np.bool_), ("argmax", np.int64)]:
        arr = getattr(res, name)
        assert isinstance(arr, np.ndarray), f"{name} is {type(arr)}"
        assert arr.shape == (n,), f"{name}: shape {arr.shape}, want ({n},)"
        assert arr.dtype == dt, f"{name}: dtype {arr.dtype}, want {np.dtype(dt)}"
    assert_close(res.nll, ref["nll"], atol, rtol, "nll")
    assert np.all(res.nll[ref["ignored"]] == 0), "ignored rows must have nll 0"
    scored = ~ref["ignored"]
    assert_close(res.lse, ref["lse"], atol, rtol, "lse", mask=scored)
    amask = ref["ok"]
    if amask.any():
        bad = np.nonzero(res.argmax[amask] != ref["argmax"][amask])[0]
        assert bad.size == 0, (
            f"argmax: row {np.nonzero(amask)[0][bad[0]]}: got {res.argmax[amask][bad[0]]}, "
            f"want {ref['argmax'][amask][bad[0]]}"
        )
    # A row holding NaN or +inf (or only -inf) has no argmax: -1, on every device.
    assert np.all(res.argmax[~amask] == -1), f"argmax of broken rows: {res.argmax[~amask]}, want -1"
    bad = np.nonzero(res.correct != ref["correct"])[0]
    assert bad.size == 0, f"correct: row {bad[0]}: got {res.correct[bad[0]]}, want {ref['correct'][bad[0]]}"
    check_summary(res.summary, res.nll, res.correct, ref["ignored"])
    # The summary's mean against the reference's own mean.
    finite = scored & np.isfinite(ref["nll"])
    if finite.any() and finite.sum() == scored.sum():
        want = ref["nll"][scored].mean()
        assert abs(res.summary.mean_nll - want) <= atol + rtol * abs(want), (res.summary.mean_nll, want)
    return ref


def exact_sums(nll) -> tuple[int, int]:
    """The fixed-point sums (units of 2^-64, each value truncated toward zero) of finite f32 nlls."""
    s = s2 = 0
    for v in np.asarray(nll, np.float32).astype(np.float64):
        if math.isfinite(v):
            s += int(v * SCALE)
            s2 += int(v * v * SCALE)
    return s, s2


def is_nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def check_summary(s, nll, correct, ignored) -> None:
    """A Summary against the per-row values it summarises: counts, exact sums and formulas."""
    nll = np.asarray(nll, np.float32)
    ignored = np.asarray(ignored, bool)
    scored = ~ignored
    v = nll[scored].astype(np.float64)
    n = int(scored.sum())
    assert s.tokens == n, f"tokens {s.tokens} != {n}"
    assert s.ignored == int(ignored.sum()), f"ignored {s.ignored} != {int(ignored.sum())}"
    assert s.correct == int(np.asarray(correct)[scored].sum()), f"correct {s.correct}"
    assert s.nan == int(np.isnan(v).sum()), f"nan {s.nan}"
    assert s.infinite == int(np.isinf(v).sum()), f"infinite {s.infinite}"
    d = json.loads(s.to_json())
    s1, s2 = exact_sums(v)
    assert d["sum_nll_fixed"] == str(s1), f"sum_nll_fixed {d['sum_nll_fixed']} != {s1}"
    assert d["sum_nll_sq_fixed"] == str(s2), f"sum_nll_sq_fixed {d['sum_nll_sq_fixed']} != {s2}"
    if n == 0 or s.nan:
        assert is_nan(s.mean_nll), s.mean_nll
        return
    if s.infinite:
        assert s.mean_nll == math.inf
        return
    mean = s1 / SCALE / n
    assert s.mean_nll == pytest.approx(mean, rel=1e-12, abs=1e-300)
    assert s.mean_nll == pytest.approx(v.mean(), rel=1e-9, abs=1e-12)
    assert s.perplexity == pytest.approx(math.exp(mean), rel=1e-12)
    assert s.bits_per_token == pytest.approx(mean / math.log(2), rel=1e-12)
    assert s.accuracy == pytest.approx(s.correct / n, rel=1e-15)
    if n >= 2:
        var = max(s2 / SCALE / n - mean * mean, 0.0)
        assert s.ppl_stderr == pytest.approx(math.exp(mean) * math.sqrt(var / (n - 1)), rel=1e-9, abs=1e-12)
    else:
        assert is_nan(s.ppl_stderr)


def summary_dict(s, drop=("seconds",)) -> dict:
    """A summary's JSON object without the fields that differ between equal runs."""
    d = json.loads(s.to_json())
    for k in drop:
        d.pop(k, None)
    return d


def merged_dict(s) -> dict:
    """As summary_dict, also without `device` (a merge says "merged", as `xent merge` writes)."""
    return summary_dict(s, drop=("seconds", "device"))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.float64): "F64",
    np.dtype(np.int16): "I16",
}


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Writes a .safetensors file by hand: u64 LE header length, JSON header (space-padded so the
    data is 8-byte aligned), then each tensor's raw little-endian bytes in order, back to back (the
    format allows no gaps: put 8-byte tensors first so every tensor stays aligned)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.tobytes()
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text))) % 8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    return path


def write_npy(path, arr) -> Path:
    """np.save of a little-endian array (f32, f16, i8, i4, u4: what xent reads)."""
    path = Path(path)
    np.save(path, np.ascontiguousarray(arr))
    return path


def xent_bin() -> str | None:
    """The CLI binary: $XENT_BIN, else target/release/xent of this repository, else `xent` on PATH."""
    env = os.environ.get("XENT_BIN")
    if env:
        return env if os.path.isfile(env) else None
    here = Path(__file__).resolve().parents[2] / "target" / "release" / "xent"
    if here.is_file():
        return str(here)
    return shutil.which("xent")


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's name, so every test is deterministic on its own."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
