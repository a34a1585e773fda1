#!/usr/bin/env python3
"""Checks xent's f64 training reference (loss and d loss / d logits) against PyTorch's autograd in
float64, over shapes and every option alone and combined. Not part of the test suite (CI installs
no torch); run it where torch and the xent package are installed:
    pip install ./python torch numpy
    python benches/peers/train_reference_check.py
torch has no z-loss or soft-cap: they are written here in torch ops (z = cap * tanh(x / cap) before
F.cross_entropy; + z_loss * logsumexp(z)**2 per row not ignored, reduced as the rest), which is
what xent's documentation defines. Prints one line per case and the worst differences; exits 1 if
any case differs by more than 1e-9 (relative to the gradient's scale).
"""
from __future__ import annotations

import itertools
import sys

import numpy as np
import torch
import torch.nn.functional as F

import xent


def torch_loss(x, t, weight, ignore_index, reduction, eps, c, cap):
    z = cap * torch.tanh(x / cap) if cap else x
    loss = F.cross_entropy(z, t, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    if c:
        keep = t != ignore_index
        lse = torch.logsumexp(z, dim=1)
        zl = torch.where(keep, c * lse * lse, torch.zeros_like(lse))
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            wt = weight[t.clamp(min=0)] if weight is not None else torch.ones_like(lse)
            loss = loss + zl.sum() / torch.where(keep, wt, torch.zeros_like(wt)).sum()
    return loss


def case(rng, rows, vocab, *, weighted, ignore, reduction, eps, c, cap, special):
    x = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    t = rng.integers(0, vocab, rows).astype(np.int64)
    if ignore:
        t[rng.random(rows) < 0.3] = -100
    if special:
        # -inf logits away from the targets (torch and xent agree there; NaN rows are compared apart).
        for r in range(rows):
            j = (t[r] + 1) % vocab if vocab > 1 else None
            if j is not None and t[r] >= 0:
                x[r, j] = -np.inf
    w = (rng.random(vocab) * 2 + 0.1).astype(np.float32) if weighted else None
    kw = dict(weight=w, ignore_index=-100, reduction=reduction, label_smoothing=eps, z_loss=c, softcap=cap)
    ref_loss, ref_grad = xent._xent._reference_cross_entropy(x, t, **kw)
    xt = torch.from_numpy(x).double().requires_grad_()
    wt = torch.from_numpy(w).double() if w is not None else None
    # xent takes the options as float32: torch gets the same values.
    eps32, c32 = float(np.float32(eps)), float(np.float32(c))
    loss = torch_loss(xt, torch.from_numpy(t), wt, -100, reduction, eps32, c32, cap)
    (loss.sum() if reduction == "none" else loss).backward()
    tl = loss.detach().numpy()
    tg = xt.grad.numpy()
    rl = np.asarray(ref_loss, dtype=np.float64)
    both_nan = np.isnan(tl) & np.isnan(rl)
    same_inf = np.isinf(tl) & (tl == rl)
    with np.errstate(invalid="ignore"):
        dl = np.where(both_nan | same_inf, 0.0, np.abs(tl - rl) / np.maximum(1.0, np.abs(tl)))
    scale = max(1.0, float(np.nanmax(np.abs(tg))) if np.isfinite(tg).any() else 1.0)
    gnan = np.isnan(tg) & np.isnan(ref_grad)
    dg = np.where(gnan, 0.0, np.abs(tg - ref_grad) / scale)
    return float(np.max(dl)), float(np.max(dg)) if dg.size else 0.0


def main() -> int:
    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(0)
    worst_l = worst_g = 0.0
    n = 0
    failed = []
    shapes = [(1, 1), (3, 2), (7, 17), (16, 1000), (4, 32000)]
    opts = itertools.product([False, True], [False, True], ["mean", "sum", "none"], [0.0, 0.1], [0.0, 1e-3],
                             [None, 5.0], [False, True])
    for (weighted, ignore, reduction, eps, c, cap, special) in opts:
        for rows, vocab in shapes:
            dl, dg = case(rng, rows, vocab, weighted=weighted, ignore=ignore, reduction=reduction, eps=eps, c=c,
                          cap=cap, special=special)
            n += 1
            worst_l, worst_g = max(worst_l, dl), max(worst_g, dg)
            if dl > 1e-9 or dg > 1e-9:
                failed.append((rows, vocab, weighted, ignore, reduction, eps, c, cap, special, dl, dg))
    # All rows ignored: torch's mean is NaN with gradient 0, as xent's.
    x = np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)
    t = np.full(4, -100)
    rl, rg = xent._xent._reference_cross_entropy(x, t)
    xt = torch.from_numpy(x).double().requires_grad_()
    tl = F.cross_entropy(xt, torch.from_numpy(t))
    tl.backward()
    all_ignored_ok = np.isnan(rl) and np.isnan(tl.item()) and np.all(rg == 0) and np.all(xt.grad.numpy() == 0)
    # A NaN row that is not ignored: loss and gradient NaN in both.
    x[1, 3] = np.nan
    t = np.array([1, 2, 3, 4])
    rl, rg = xent._xent._reference_cross_entropy(x, t, reduction="none")
    xt = torch.from_numpy(x).double().requires_grad_()
    tl = F.cross_entropy(xt, torch.from_numpy(t), reduction="none")
    tl.sum().backward()
    nan_row_ok = (np.isnan(rl[1]) and np.isnan(tl[1].item()) and np.isnan(rg[1]).all()
                  and np.isnan(xt.grad.numpy()[1]).all() and np.isfinite(rg[[0, 2, 3]]).all())
    print(f"{n} cases (shapes {shapes} x weight x ignore x reduction x smoothing x z_loss x softcap x -inf): "
          f"worst relative loss difference {worst_l:.2e}, worst gradient difference {worst_g:.2e} (of the "
          f"gradient's largest magnitude)")
    print(f"all rows ignored: mean NaN, gradient 0 in both: {all_ignored_ok}")
    print(f"a NaN row: loss and gradient NaN in both, other rows finite: {nan_row_ok}")
    print(f"torch {torch.__version__}")
    for f in failed[:10]:
        print("DIFFERS:", f)
    return 1 if failed or not all_ignored_ok or not nan_row_ok else 0


if __name__ == "__main__":
    sys.exit(main())
