"""xent.kld and xent.kld_files against a float64 reference; KldSummary statistics, JSON, pickling and
exact merging; errors; and the CLI's own kld summary."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess

import numpy as np
import pytest

import xent
from conftest import (
    DTYPES,
    KLD_ATOL,
    KLD_RTOL,
    as_f64,
    assert_close,
    make_logits,
    make_targets,
    need_device,
    ref_kld,
    merged_dict,
    summary_dict,
    write_npy,
    write_safetensors,
    xent_bin,
)

SCALE = 2**64


def noisy(rng, base, sd, dtype=None):
    """The base logits plus normal noise of `sd`, in `dtype` (default: the base's)."""
    y = as_f64(base) + rng.standard_normal(base.shape) * sd
    return y.astype(np.float32).astype(dtype or base.dtype)


def check_kld(res, base, test, targets=None, ignore_index=-100):
    ref = ref_kld(base, test, targets, ignore_index)
    n = ref["kld"].shape[0]
    assert res.kld.dtype == np.float32 and res.kld.shape == (n,)
    assert res.same_top.dtype == np.bool_ and res.same_top.shape == (n,)
    assert_close(res.kld, ref["kld"], KLD_ATOL, KLD_RTOL, "kld")
    bad = np.nonzero(res.same_top != ref["same_top"])[0]
    assert bad.size == 0, f"same_top row {bad[0]}: got {res.same_top[bad[0]]}, want {ref['same_top'][bad[0]]}"
    if targets is None:
        assert res.nll_base is None and res.nll_test is None and res.dp is None
    else:
        for k in ("nll_base", "nll_test", "dp"):
            arr = getattr(res, k)
            assert arr.dtype == np.float32 and arr.shape == (n,), k
            assert_close(arr, ref[k], what=k)
    check_kld_summary(res.summary, res.kld, res.same_top, ref["ignored"], res.dp)
    return ref


def llama_median(v32):
    v = np.sort(np.asarray(v32, np.float32))
    n = len(v)
    if n % 2:
        return float(v[n // 2])
    return float(np.float32(0.5) * (v[n // 2] + v[n // 2 - 1]))


def check_kld_summary(s, kld, same_top, ignored, dp=None):
    """A KldSummary against the per-row values it summarises (llama.cpp's formulas)."""
    ignored = np.asarray(ignored, bool)
    k = np.asarray(kld, np.float32)[~ignored]
    n = k.size
    assert s.tokens == n, (s.tokens, n)
    assert s.ignored == int(ignored.sum())
    if n == 0:
        return
    assert s.same_top == pytest.approx(np.asarray(same_top)[~ignored].sum() / n, rel=1e-15)
    fixed = sum(int(float(v) * SCALE) for v in k)
    fixed2 = sum(int(float(v) * float(v) * SCALE) for v in k)
    mean = fixed / SCALE / n
    assert s.kld_mean == pytest.approx(mean, rel=1e-12, abs=1e-300)
    var = fixed2 / SCALE / n - mean * mean
    want_stderr = math.sqrt(var / (n - 1)) if (n > 10 and var > 0) else 0.0
    assert s.kld_stderr == pytest.approx(want_stderr, rel=1e-9, abs=1e-15)
    assert s.kld_max == float(k.max())
    assert s.kld_min == float(k.min())
    assert s.kld_median == pytest.approx(llama_median(k), rel=1e-7, abs=1e-12)
    # Other percentiles through attribute access.
    for name in ("kld_p99", "kld_p99_9", "kld_p95", "kld_p90", "kld_p10", "kld_p5", "kld_p1", "kld_p0_1"):
        v = getattr(s, name)
        assert s.kld_min <= v <= s.kld_max, (name, v)
    assert s.kld_p99 >= s.kld_median >= s.kld_p1
    if dp is not None:
        d = np.asarray(dp, np.float32)[~ignored].astype(np.float64)
        assert s.dp_mean == pytest.approx(d.mean(), rel=1e-9, abs=1e-12)
        assert s.dp_max == float(d.max()) and s.dp_min == float(d.min())


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bdtype,tdtype",
    [("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"), ("f32", "bf16"), ("bf16", "f16")],
)
@pytest.mark.parametrize("layout", ["NV", "BTV"])
def test_dtypes_and_layouts(device, bdtype, tdtype, layout, rng):
    shape = (40, 700) if layout == "NV" else (4, 10, 700)
    base = make_logits(rng, shape, bdtype)
    test = noisy(rng, base, 0.3, DTYPES[tdtype])
    t = make_targets(rng, shape[:-1], shape[-1])
    t.reshape(-1)[::6] = -100
    res = xent.kld(base, test, t, device=device)
    assert res.device == device and res.summary.device == device
    ref = check_kld(res, base, test, t)
    assert np.all(res.kld[ref["ignored"]] == 0)


@pytest.mark.parametrize("sd", [1e-3, 1e-2, 1.0])
def test_close_models_accuracy(device, sd, rng):
    vocab = 50257 if device == "cpu" else 4096
    rows = 24 if device == "cpu" else 32
    base = make_logits(rng, (rows, vocab), "f32")
    test = noisy(rng, base, sd)
    res = xent.kld(base, test, device=device)
    check_kld(res, base, test)
    assert np.all(res.kld >= 0)


@pytest.mark.parametrize("vocab", [1, 2, 3, 17, 1000, 4099])
def test_vocab_sizes(device, vocab, rng):
    base = make_logits(rng, (16, vocab), "f32")
    test = noisy(rng, base, 0.5)
    t = make_targets(rng, 16, vocab)
    res = xent.kld(base, test, t, device=device)
    check_kld(res, base, test, t)
    if vocab == 1:
        assert np.all(res.kld == 0) and np.all(res.same_top)
        assert np.all(res.nll_base == 0) and np.all(res.dp == 0)


def test_identical_inputs(device, rng):
    base = make_logits(rng, (20, 300), "bf16")
    res = xent.kld(base, base, make_targets(rng, 20, 300), device=device)
    assert np.all(np.abs(res.kld) <= 1e-7)
    assert np.all(res.same_top)
    assert np.all(np.abs(res.dp) <= 1e-6)
    np.testing.assert_allclose(res.nll_base, res.nll_test, atol=1e-6, rtol=1e-6)
    assert res.summary.same_top == 1.0


def test_without_targets(device, rng):
    base = make_logits(rng, (3, 7, 64), "f16")
    test = noisy(rng, base, 0.2)
    res = xent.kld(base, test, device=device)
    check_kld(res, base, test)
    assert res.summary.tokens == 21 and res.summary.ignored == 0
    with pytest.raises(AttributeError):
        res.summary.no_such_statistic  # noqa: B018


def test_with_targets_statistics(rng):
    base = make_logits(rng, (200, 100), "f32")
    test = noisy(rng, base, 0.4)
    t = make_targets(rng, 200, 100)
    t[::10] = -100
    res = xent.kld(base, test, t, device="cpu")
    ref = check_kld(res, base, test, t)
    s = res.summary
    keep = ~ref["ignored"]
    assert s.ppl_base == pytest.approx(math.exp(ref["nll_base"][keep].mean()), rel=1e-5)
    assert s.ppl_test == pytest.approx(math.exp(ref["nll_test"][keep].mean()), rel=1e-5)
    assert s.ln_ppl_ratio == pytest.approx(ref["nll_test"][keep].mean() - ref["nll_base"][keep].mean(), abs=1e-5)
    assert s.dp_rms == pytest.approx(math.sqrt((ref["dp"][keep] ** 2).mean()), rel=1e-5)
    d = s.to_dict()
    for key in ("ppl_base", "ppl_test", "ppl_cor", "dp_mean", "dp_rms", "kld_p99"):
        assert key in d, key
        assert d[key] == getattr(s, key)


def test_ignore_index_custom(rng):
    base = make_logits(rng, (30, 12), "f32")
    test = noisy(rng, base, 0.3)
    t = make_targets(rng, 30, 12)
    res = xent.kld(base, test, t, device="cpu", ignore_index=5)
    ref = check_kld(res, base, test, t, ignore_index=5)
    assert res.summary.ignored == int((t == 5).sum()) == int(ref["ignored"].sum())


def test_special_values(device):
    v = 5
    a = np.tile(np.linspace(-1, 1, v, dtype=np.float32), (4, 1))
    b = a.copy()
    a[0, 1] = np.nan  # broken base row -> NaN
    b[1, 2] = np.inf  # broken test row -> NaN
    b[2, 0] = -np.inf  # q = 0 where p > 0 -> +inf
    a[3, 0] = b[3, 0] = -np.inf  # p = q = 0 there: contributes nothing
    res = xent.kld(a, b, device=device)
    assert np.isnan(res.kld[0]) and np.isnan(res.kld[1])
    assert res.kld[2] == np.inf
    assert abs(res.kld[3]) <= 1e-7
    assert not res.same_top[0] and not res.same_top[1]
    assert res.summary.tokens == 4


def test_mixed_producers(rng):
    class DLPackOnly:
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, *args, **kwargs):
            return self._a.__dlpack__(*args, **kwargs)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    base = make_logits(rng, (10, 50), "f32")
    test = noisy(rng, base, 0.1, np.float16)
    t = make_targets(rng, 10, 50, np.int32)
    check_kld(xent.kld(DLPackOnly(base), memoryview(test), DLPackOnly(t), device="cpu"), base, test, t)


# --------------------------------------------------------------------------------------------
# KldSummary: JSON, pickle, merge
# --------------------------------------------------------------------------------------------


def split_rows():
    return max(64, os.cpu_count() or 1)


def test_summary_json_and_pickle(rng):
    base = make_logits(rng, (80, 200), "f32")
    test = noisy(rng, base, 0.2)
    t = make_targets(rng, 80, 200)
    s = xent.kld(base, test, t, device="cpu").summary
    assert isinstance(s, xent.KldSummary)
    d = json.loads(s.to_json())
    assert d["kind"] == "kld"
    for k in ("tokens", "ignored", "kld_mean", "kld_stderr", "kld_max", "kld_median", "kld_min", "same_top",
              "same_top_stderr", "device", "seconds", "ppl_base", "dp_mean"):  # fmt: skip
        assert k in d, k
    for k in ("tokens", "ignored", "kld_mean", "kld_stderr", "kld_max", "kld_min", "same_top", "device"):
        assert d[k] == getattr(s, k), k
    td = s.to_dict()
    for k in ("tokens", "kld_mean", "kld_median", "same_top"):
        assert td[k] == getattr(s, k)
    stable = ("tokens", "ignored", "kld_mean", "kld_stderr", "kld_max", "kld_min", "same_top", "same_top_stderr",
              "ppl_base", "ppl_test", "dp_mean", "dp_rms")  # fmt: skip
    back = xent.KldSummary.from_json(s.to_json())
    back_b = xent.KldSummary.from_json(s.to_json().encode())
    pick = pickle.loads(pickle.dumps(s))
    for other in (back, back_b, pick):
        assert isinstance(other, xent.KldSummary)
        for k in stable:
            assert getattr(other, k) == getattr(s, k), k
        # Percentiles survive (exactly, or within the sketch's relative accuracy 6.1e-5).
        assert other.kld_median == pytest.approx(s.kld_median, rel=1.3e-4)
        assert other.kld_p99 == pytest.approx(s.kld_p99, rel=1.3e-4)


def test_kld_pickle_is_lossless(rng):
    # A pickled summary (what Ray or multiprocessing ship between workers) keeps everything,
    # exact percentile values included, so merging pickled shards still equals one run.
    base = make_logits(rng, (2 * split_rows(), 300), "f32")
    test = noisy(rng, base, 0.2)
    whole = xent.kld(base, test, device="cpu").summary
    n = split_rows()
    parts = [xent.kld(base[a : a + n], test[a : a + n], device="cpu").summary for a in (0, n)]
    pick = pickle.loads(pickle.dumps(whole))
    assert summary_dict(pick) == summary_dict(whole)
    assert pick.device == whole.device and pick.seconds == whole.seconds
    merged = xent.merge([pickle.loads(pickle.dumps(p)) for p in parts])
    assert merged_dict(merged) == merged_dict(whole)


@pytest.mark.parametrize("text", ["", "nope", "[]", '{"kind":"kld"}', '{"kind":"other"}'])
def test_kld_from_json_rejects(text):
    with pytest.raises(ValueError):
        xent.KldSummary.from_json(text)


def test_kld_from_json_rejects_score_summary(rng):
    x = make_logits(rng, (5, 6), "f32")
    s = xent.score(x, make_targets(rng, 5, 6), device="cpu").summary
    with pytest.raises(ValueError):
        xent.KldSummary.from_json(s.to_json())


@pytest.mark.parametrize("with_targets", [False, True])
def test_merge_equals_one_run_exactly(rng, with_targets):
    n = split_rows()
    base = make_logits(rng, (3 * n + 7, 600), "bf16")
    test = noisy(rng, base, 0.05)
    t = make_targets(rng, len(base), 600) if with_targets else None
    if t is not None:
        t[::8] = -100
    one = xent.kld(base, test, t, device="cpu").summary
    cuts = [0, n, 2 * n + 1, len(base)]
    parts = [
        xent.kld(base[a:b], test[a:b], None if t is None else t[a:b], device="cpu").summary
        for a, b in zip(cuts, cuts[1:])
    ]
    want = merged_dict(one)
    for m in (parts[0] + parts[1] + parts[2], sum(parts), xent.merge(parts), xent.merge(iter(parts[::-1]))):
        assert isinstance(m, xent.KldSummary)
        assert merged_dict(m) == want
        assert m.device == "merged"
    # Through JSON (as shards written by --summary-out): exact sums, sketch percentiles.
    mj = xent.merge([xent.KldSummary.from_json(p.to_json()) for p in parts])
    for k in ("tokens", "ignored", "kld_mean", "kld_stderr", "kld_max", "kld_min", "same_top"):
        assert getattr(mj, k) == getattr(one, k), k
    assert mj.kld_median == pytest.approx(one.kld_median, rel=1.3e-4)


def test_kld_summary_type_errors(rng):
    base = make_logits(rng, (12, 20), "f32")
    k = xent.kld(base, base, device="cpu").summary
    s = xent.score(base, make_targets(rng, 12, 20), device="cpu").summary
    with pytest.raises(TypeError):
        k + s  # noqa: B018
    with pytest.raises(TypeError):
        k + 1  # noqa: B018
    assert 0 + k is not None


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors():
    a = np.zeros((4, 10), np.float32)
    with pytest.raises(ValueError):
        xent.kld(a, np.zeros((5, 10), np.float32), device="cpu")  # rows differ
    with pytest.raises(ValueError):
        xent.kld(a, np.zeros((4, 11), np.float32), device="cpu")  # vocab differs
    with pytest.raises(ValueError, match="contiguous"):
        xent.kld(a, np.zeros((4, 20), np.float32)[:, ::2], device="cpu")
    with pytest.raises(ValueError, match="contiguous"):
        xent.kld(np.zeros((10, 4), np.float32).T, a, device="cpu")
    with pytest.raises(TypeError):
        xent.kld(a.astype(np.float64), a, device="cpu")
    with pytest.raises(TypeError):
        xent.kld(a, "test", device="cpu")
    with pytest.raises(TypeError):
        xent.kld(a, a, np.zeros(4, np.float32), device="cpu")
    with pytest.raises(ValueError, match=r"row 2: target 10 is outside the vocabulary of 10"):
        xent.kld(a, a, np.array([0, 1, 10, 3]), device="cpu")
    with pytest.raises(ValueError):
        xent.kld(a, a, np.zeros(3, np.int64), device="cpu")
    with pytest.raises(ValueError):
        xent.kld(np.zeros(10, np.float32), np.zeros(10, np.float32), device="cpu")
    with pytest.raises(ValueError):
        xent.kld(a, a, device="npu")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_kld_files(tmp_path, rng):
    base = make_logits(rng, (3, 20, 400), "bf16")
    test = noisy(rng, base, 0.1, np.float16)
    t = make_targets(rng, (3, 20), 400)
    t[0, 4] = -100
    bp = write_safetensors(tmp_path / "base.safetensors", {"logits": base})
    tp_ = write_npy(tmp_path / "test.npy", test)
    lp = write_npy(tmp_path / "labels.npy", t)
    s = xent.kld_files(bp, tp_, lp, device="cpu")
    assert isinstance(s, xent.KldSummary)
    mem = xent.kld(base, test, t, device="cpu")
    ref = ref_kld(base, test, t)
    assert s.tokens == 59 and s.ignored == 1
    keep = ~ref["ignored"]
    assert s.kld_mean == pytest.approx(ref["kld"][keep].mean(), rel=1e-4, abs=1e-7)
    assert s.kld_mean == pytest.approx(mem.summary.kld_mean, rel=1e-6)
    # Without targets, and with shift.
    s0 = xent.kld_files(bp, tp_, device="cpu")
    assert s0.tokens == 60
    ss = xent.kld_files(bp, tp_, lp, device="cpu", shift=True)
    refs = ref_kld(base[:, :-1], test[:, :-1], t[:, 1:])
    assert ss.tokens == int((~refs["ignored"]).sum())
    assert ss.kld_mean == pytest.approx(refs["kld"][~refs["ignored"]].mean(), rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError):
        xent.kld_files(bp, tp_, device="cpu", shift=True)  # shift needs targets


def test_kld_files_shards_merge(tmp_path, rng):
    (tmp_path / "B").mkdir()
    (tmp_path / "T").mkdir()
    parts = []
    for i in range(3):
        base = make_logits(rng, (70, 300), "f32")
        write_npy(tmp_path / "B" / f"b{i}.npy", base)
        write_npy(tmp_path / "T" / f"t{i}.npy", noisy(rng, base, 0.05))
    whole = xent.kld_files(str(tmp_path / "B" / "b*.npy"), tmp_path / "T", device="cpu")
    for i in range(3):
        parts.append(xent.kld_files(tmp_path / "B" / f"b{i}.npy", tmp_path / "T" / f"t{i}.npy", device="cpu"))
    assert whole.tokens == 210
    assert merged_dict(xent.merge(parts)) == merged_dict(whole)


def test_kld_files_errors(tmp_path, rng):
    bp = write_npy(tmp_path / "b.npy", make_logits(rng, (5, 8), "f32"))
    other = write_npy(tmp_path / "other.npy", make_logits(rng, (5, 9), "f32"))
    with pytest.raises(OSError, match="nope.npy"):
        xent.kld_files(bp, tmp_path / "nope.npy", device="cpu")
    with pytest.raises(ValueError, match="other.npy|b.npy"):
        xent.kld_files(bp, other, device="cpu")


def test_kld_files_gpu(tmp_path, rng):
    need_device("gpu")
    base = make_logits(rng, (40, 1000), "f32")
    test = noisy(rng, base, 0.1)
    bp, tp_ = write_npy(tmp_path / "b.npy", base), write_npy(tmp_path / "t.npy", test)
    s = xent.kld_files(bp, tp_, device="gpu")
    assert s.device == "gpu" and s.tokens == 40
    ref = ref_kld(base, test)
    assert s.kld_mean == pytest.approx(ref["kld"].mean(), rel=1e-4, abs=1e-7)


def test_same_kld_summary_as_cli(tmp_path, rng):
    exe = xent_bin()
    if exe is None:
        pytest.skip("no xent binary: build it (cargo build --release) or set XENT_BIN to compare with the CLI")
    base = make_logits(rng, (2, 60, 500), "bf16")
    test = noisy(rng, base, 0.05)
    t = make_targets(rng, (2, 60), 500)
    t[1, 7] = -100
    bp = write_safetensors(tmp_path / "base.safetensors", {"logits": base})
    tp_ = write_safetensors(tmp_path / "test.safetensors", {"logits": test})
    lp = write_npy(tmp_path / "t.npy", t)
    out = tmp_path / "kld.json"
    args = [exe, "kld", "--base", bp, "--logits", tp_, "--targets", lp, "--device", "cpu", "--quiet",
            "--summary-out", out]  # fmt: skip
    p = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    cli_text = out.read_text()
    cli = json.loads(cli_text)
    mine = json.loads(xent.kld_files(bp, tp_, lp, device="cpu").to_json())
    assert set(mine) == set(cli)
    for k in cli:
        if k != "seconds":
            assert mine[k] == cli[k], f"{k}: python {mine[k]!r}, CLI {cli[k]!r}"
    back = xent.KldSummary.from_json(cli_text)
    assert back.tokens == cli["tokens"] and back.kld_mean == cli["kld_mean"]
