"""xent.cross_entropy (training loss and gradient) against a plain numpy float64 reference of
PyTorch's F.cross_entropy with weight / ignore_index / reduction / label_smoothing, plus z_loss and
softcap as xent defines them (checked against torch autograd by benches/peers/train_reference_check.py)."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

import xent
from conftest import need_device


def ref_loss_grad(x, t, weight=None, ignore_index=-100, reduction="mean", eps=0.0, c=0.0, cap=None):
    """float64 loss and d loss / d x; `none` gives per-row losses and the gradient of their sum."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
    t = np.asarray(t).reshape(-1)
    n, v = x.shape
    eps, c = float(np.float32(eps)), float(np.float32(c))  # xent takes them as float32
    w = np.ones(v) if weight is None else np.asarray(weight, dtype=np.float32).astype(np.float64)
    z = cap * np.tanh(x / cap) if cap else x
    keep = t != ignore_index
    tt = np.where(keep, t, 0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = z.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        p = np.exp(z - lse[:, None])
        wt = w[tt]
        smooth = (w * (lse[:, None] - z)).sum(axis=1) if eps > 0 else 0.0  # (0 * inf would be NaN)
        rows = (1 - eps) * wt * (lse - z[np.arange(n), tt]) + eps / v * smooth + c * lse**2
        rows = np.where(keep, rows, 0.0)
        wsum = wt[keep].sum()
        coef = (1 - eps) * wt + eps / v * w.sum() + 2 * c * lse
        dz = p * coef[:, None] - eps / v * w[None, :]
        dz[np.arange(n), tt] -= (1 - eps) * wt
        dx = dz * (1 - (z / cap) ** 2) if cap else dz
        scale = np.where(keep, 1.0 / wsum if reduction == "mean" else 1.0, 0.0)
        grad = np.where(keep[:, None], dx * scale[:, None], 0.0)
        loss = rows if reduction == "none" else (rows.sum() / wsum if reduction == "mean" else rows.sum())
    return loss, grad


DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}


def data(rng, rows, vocab, dtype="f32", ignored=0.2):
    x = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32).astype(DTYPES[dtype])
    t = rng.integers(0, vocab, rows)
    t[rng.random(rows) < ignored] = -100
    return x, t


def check(loss, grad, x, t, tol=2e-5, **kw):
    want_loss, want_grad = ref_loss_grad(x.astype(np.float64), t, **kw)
    got = np.asarray(loss, dtype=np.float64)
    assert np.shape(got) == np.shape(want_loss) or kw.get("reduction") == "none"
    np.testing.assert_allclose(got.reshape(-1), np.reshape(want_loss, -1), rtol=tol, atol=tol, equal_nan=True)
    if grad is not None:
        g = np.asarray(grad).astype(np.float64).reshape(want_grad.shape)
        # The gradient is stored in the logits' dtype: compare within that dtype's rounding.
        rt = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, np.dtype(ml_dtypes.bfloat16): 1.6e-2}
        r = rt[np.asarray(grad).dtype]
        np.testing.assert_allclose(g, want_grad, rtol=r, atol=r * np.nanmax(np.abs(want_grad), initial=0.0) + 1e-7, equal_nan=True)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_dtype_and_reduction(rng, device, dtype, reduction):
    need_device(device)
    x, t = data(rng, 24, 301, dtype)
    loss, grad = xent.cross_entropy(x, t, reduction=reduction, grad="separate", device=device)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    if reduction == "none":
        assert isinstance(loss, np.ndarray) and loss.dtype == np.float32 and loss.shape == t.shape
    else:
        assert isinstance(loss, float)
    check(loss, grad, x, t, reduction=reduction)


OPTIONS = list(
    itertools.product([False, True], [0.0, 0.1], [0.0, 1e-3], [None, 7.5], ["mean", "sum", "none"])
)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("weighted,eps,c,cap,reduction", OPTIONS)
def test_every_option_combination(rng, device, weighted, eps, c, cap, reduction):
    need_device(device)
    x, t = data(rng, 9, 97)
    w = (rng.random(97) + 0.25).astype(np.float32) if weighted else None
    kw = dict(weight=w, label_smoothing=eps, z_loss=c, softcap=cap, reduction=reduction)
    loss, grad = xent.cross_entropy(x, t, grad="separate", device=device, **kw)
    check(loss, grad, x, t, weight=w, eps=eps, c=c, cap=cap, reduction=reduction)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_in_place_equals_separate_bit_for_bit(rng, device, dtype):
    need_device(device)
    x, t = data(rng, 16, 1001, dtype)  # odd vocab: 16-bit rows straddle words
    loss_s, g_s = xent.cross_entropy(x, t, grad="separate", device=device, label_smoothing=0.05)
    y = x.copy()
    loss_i, g_i = xent.cross_entropy(y, t, grad="inplace", device=device, label_smoothing=0.05)
    assert g_i is y, "grad='inplace' returns the logits array itself"
    assert loss_i == loss_s
    assert g_s.tobytes() == y.tobytes()


def test_no_gradient_leaves_logits_alone(rng):
    x, t = data(rng, 8, 50)
    before = x.copy()
    loss, grad = xent.cross_entropy(x, t, device="cpu")
    assert grad is None and np.array_equal(x, before)
    check(loss, None, x, t)


def test_layouts_and_ignore_index(rng):
    x, t = data(rng, 12, 40)
    x3, t2 = x.reshape(3, 4, 40), t.reshape(3, 4)
    t2 = np.where(t2 == -100, 7, t2)
    t2[0, 0] = 7
    loss, grad = xent.cross_entropy(x3, t2, ignore_index=7, reduction="none", grad="separate", device="cpu")
    assert loss.shape == (3, 4) and grad.shape == (3, 4, 40)
    assert loss[0, 0] == 0 and np.all(grad[0, 0] == 0)
    check(loss, grad, x3.reshape(12, 40), t2.reshape(12), ignore_index=7, reduction="none")


def test_all_ignored_mean_is_nan_with_zero_gradient():
    x = np.ones((3, 5), np.float32)
    loss, grad = xent.cross_entropy(x, np.full(3, -100), grad="separate", device="cpu")
    assert np.isnan(loss) and np.all(grad == 0)


def test_nan_and_inf_rows(rng):
    x, t = data(rng, 4, 6, ignored=0.0)
    x[1, 2] = np.nan
    x[2, 3] = np.inf
    x[3, (t[3] + 1) % 6] = -np.inf
    loss, grad = xent.cross_entropy(x, t, reduction="none", grad="separate", device="cpu")
    assert np.isnan(loss[1]) and np.isnan(loss[2]) and np.isfinite(loss[[0, 3]]).all()
    assert np.isnan(grad[1]).all() and np.isnan(grad[2]).all() and np.isfinite(grad[[0, 3]]).all()
    check(loss, grad, x, t, reduction="none")


@pytest.mark.parametrize(
    "kwargs,exc,text",
    [
        (dict(grad="both"), ValueError, "grad 'both'"),
        (dict(reduction="avg"), ValueError, "unknown reduction 'avg'"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(weight=np.ones(3)), ValueError, "weight"),
    ],
)
def test_bad_options_are_one_line_errors(rng, kwargs, exc, text):
    x, t = data(rng, 4, 10)
    with pytest.raises(exc, match=text) as e:
        xent.cross_entropy(x, t, device="cpu", **kwargs)
    assert "\n" not in str(e.value)


def test_in_place_needs_a_writable_array(rng):
    x, t = data(rng, 4, 10)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        xent.cross_entropy(x, t, grad="inplace", device="cpu")


def test_targets_out_of_range(rng):
    x, _ = data(rng, 4, 10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        xent.cross_entropy(x, np.array([0, 1, 10, 2]), device="cpu")
