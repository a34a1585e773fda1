"""xent.Summary: fields, JSON (the CLI's --summary-out object), pickling, and exact merging."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle

import numpy as np
import pytest

import xent
from conftest import check_summary, exact_sums, make_logits, make_targets, merged_dict

# The object `xent score --summary-out` writes, key for key, in order.
CLI_KEYS = [
    "tokens",
    "ignored",
    "mean_nll",
    "bits_per_token",
    "perplexity",
    "ppl_stderr",
    "accuracy",
    "device",
    "seconds",
    "correct",
    "nan",
    "infinite",
    "sum_nll_fixed",
    "sum_nll_sq_fixed",
]
CONTRACT_FIELDS = ["tokens", "ignored", "correct", "nan", "infinite", "mean_nll", "perplexity", "ppl_stderr",
                   "bits_per_token", "accuracy", "device", "seconds"]  # fmt: skip


def split_rows() -> int:
    # Per-row CPU results are bit-identical across calls when every call has at least as many rows
    # as threads (a row is cut the same way): splits of at least this many rows merge exactly.
    return max(64, os.cpu_count() or 1)


def scored(rng, rows=None, vocab=700, dtype="f32", ignore_every=9):
    rows = rows or 3 * split_rows()
    x = make_logits(rng, (rows, vocab), dtype)
    t = make_targets(rng, rows, vocab)
    t[::ignore_every] = -100
    return x, t


def test_fields_and_types(rng):
    x, t = scored(rng, rows=100)
    s = xent.score(x, t, device="cpu").summary
    assert isinstance(s, xent.Summary)
    for f in ["tokens", "ignored", "correct", "nan", "infinite"]:
        assert type(getattr(s, f)) is int, f
    for f in ["mean_nll", "perplexity", "ppl_stderr", "bits_per_token", "accuracy", "seconds"]:
        assert type(getattr(s, f)) is float, f
    assert s.device == "cpu"
    assert s.seconds >= 0
    assert s.tokens + s.ignored == 100
    assert 0 <= s.accuracy <= 1
    assert math.isclose(2**s.bits_per_token, s.perplexity, rel_tol=1e-12)


def test_to_dict_matches_attributes(rng):
    x, t = scored(rng, rows=50)
    s = xent.score(x, t, device="cpu").summary
    d = s.to_dict()
    assert isinstance(d, dict)
    for k in CONTRACT_FIELDS:
        assert k in d, k
        assert d[k] == getattr(s, k), k
    for k in ["sum_nll_fixed", "sum_nll_sq_fixed"]:
        assert k in d
        assert int(d[k]) == int(json.loads(s.to_json())[k])


def test_to_json_is_the_cli_object(rng):
    x, t = scored(rng, rows=50)
    s = xent.score(x, t, device="cpu").summary
    text = s.to_json()
    assert "\n" not in text.strip()
    d = json.loads(text)
    assert list(d) == CLI_KEYS
    assert isinstance(d["sum_nll_fixed"], str) and isinstance(d["sum_nll_sq_fixed"], str)
    for k in ["tokens", "ignored", "correct", "nan", "infinite"]:
        assert d[k] == getattr(s, k)
    for k in ["mean_nll", "perplexity", "ppl_stderr", "bits_per_token", "accuracy"]:
        assert d[k] == getattr(s, k), k  # shortest round-trip representation: exact
    assert d["device"] == "cpu"


def test_nan_is_null_in_json():
    s = xent.score(np.array([[np.nan, 0.0]], np.float32), np.array([0]), device="cpu").summary
    d = json.loads(s.to_json())
    assert d["mean_nll"] is None and d["perplexity"] is None and d["ppl_stderr"] is None
    assert d["nan"] == 1 and d["tokens"] == 1
    e = xent.Summary()
    d = json.loads(e.to_json())
    assert d["tokens"] == 0 and d["mean_nll"] is None and d["accuracy"] is None
    assert d["sum_nll_fixed"] == "0"


def test_json_round_trip(rng):
    x, t = scored(rng, rows=80)
    s = xent.score(x, t, device="cpu").summary
    back = xent.Summary.from_json(s.to_json())
    assert back == s
    assert back.to_json() == s.to_json()
    assert back.device == s.device and back.seconds == s.seconds
    assert xent.Summary.from_json(s.to_json().encode()) == s  # bytes too


def test_from_json_of_a_cli_style_object():
    # As `xent score --summary-out` writes it, trailing newline included.
    v = [1.5, 2.25, 0.125]
    s1, s2 = exact_sums(np.array(v, np.float32))
    text = (
        '{"tokens":3,"ignored":2,"mean_nll":1.2916666666666667,"bits_per_token":1.8634,"perplexity":3.63,'
        '"ppl_stderr":0.5,"accuracy":0.3333333333333333,"device":"gpu","seconds":0.25,"correct":1,"nan":0,'
        f'"infinite":0,"sum_nll_fixed":"{s1}","sum_nll_sq_fixed":"{s2}"}}\n'
    )
    s = xent.Summary.from_json(text)
    assert (s.tokens, s.ignored, s.correct, s.nan, s.infinite) == (3, 2, 1, 0, 0)
    # Derived values come from the exact sums, not the (rounded) text.
    assert s.mean_nll == pytest.approx(sum(v) / 3, rel=1e-15)
    assert s.perplexity == pytest.approx(math.exp(sum(v) / 3), rel=1e-14)
    var = sum(a * a for a in v) / 3 - (sum(v) / 3) ** 2
    assert s.ppl_stderr == pytest.approx(math.exp(sum(v) / 3) * math.sqrt(var / 2), rel=1e-12)
    assert s.accuracy == pytest.approx(1 / 3)
    assert s.device == "gpu" and s.seconds == 0.25


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1, 2]",
        '{"tokens": 3}',
        '{"tokens":1,"ignored":0,"correct":0,"nan":0,"infinite":0,"sum_nll_fixed":"x","sum_nll_sq_fixed":"0"}',
        '{"tokens":1,"ignored":0,"correct":5,"nan":0,"infinite":0,"sum_nll_fixed":"0","sum_nll_sq_fixed":"0"}',
        '{"kind":"kld","tokens":1}',
    ],
    ids=["empty", "garbage", "json-list", "no-sums", "bad-sum", "correct>tokens", "kld-kind"],
)
def test_from_json_rejects(text):
    with pytest.raises(ValueError) as e:
        xent.Summary.from_json(text)
    assert "\n" not in str(e.value).strip()


def test_from_json_rejects_kld_summary(rng):
    b = make_logits(rng, (12, 30), "f32")
    k = xent.kld(b, b, device="cpu").summary
    with pytest.raises(ValueError):
        xent.Summary.from_json(k.to_json())


def test_pickle_and_copy(rng):
    x, t = scored(rng, rows=60)
    s = xent.score(x, t, device="cpu").summary
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(s, protocol=proto))
        assert isinstance(back, xent.Summary)
        assert back == s
        assert back.to_json() == s.to_json()
    assert copy.deepcopy(s) == s and copy.copy(s) == s
    e = pickle.loads(pickle.dumps(xent.Summary()))
    assert e == xent.Summary() and e.tokens == 0


def test_empty_summary_is_the_identity(rng):
    x, t = scored(rng, rows=64)
    s = xent.score(x, t, device="cpu").summary
    e = xent.Summary()
    assert e.tokens == 0 and e.ignored == 0 and e.correct == 0
    assert e + s == s and s + e == s
    assert 0 + s == s
    assert sum([s]) == s


def test_merge_equals_one_run_exactly(rng):
    n = split_rows()
    x, t = scored(rng, rows=3 * n + 5)
    # A few special rows so the counts are exercised too.
    assert t[1] != -100 and t[2] != -100
    x[1, 3] = np.nan  # a NaN row
    x[2, t[2]] = -np.inf  # an infinite row
    whole = xent.score(x, t, device="cpu")
    cuts = [0, n, 2 * n + 3, len(t)]
    parts = [xent.score(x[a:b], t[a:b], device="cpu").summary for a, b in zip(cuts, cuts[1:])]
    one = whole.summary
    assert one.nan == 1 and one.infinite == 1
    merged_add = parts[0] + parts[1] + parts[2]
    merged_assoc = parts[0] + (parts[1] + parts[2])
    merged_sum = sum(parts)
    merged_fn = xent.merge(parts)
    merged_gen = xent.merge(p for p in parts)
    merged_json = xent.merge([xent.Summary.from_json(p.to_json()) for p in parts])
    for m in [merged_add, merged_assoc, merged_sum, merged_fn, merged_gen, merged_json]:
        assert isinstance(m, xent.Summary)
        assert m == one
        assert merged_dict(m) == merged_dict(one)
        assert m.device == "merged"
    # And with no NaN rows, every derived value equals the one-run value to the last bit.
    t2 = t.copy()
    x2 = x.copy()
    x2[1, 3] = 0.0
    x2[2] = 0.0
    one = xent.score(x2, t2, device="cpu").summary
    parts = [xent.score(x2[a:b], t2[a:b], device="cpu").summary for a, b in zip(cuts, cuts[1:])]
    m = xent.merge(parts)
    for f in ["mean_nll", "perplexity", "ppl_stderr", "bits_per_token", "accuracy"]:
        assert getattr(m, f) == getattr(one, f), f
    assert merged_dict(m) == merged_dict(one)
    res = xent.score(x2, t2, device="cpu")
    check_summary(m, res.nll, res.correct, t2 == -100)


def test_merge_of_shuffled_order(rng):
    n = split_rows()
    x, t = scored(rng, rows=4 * n, dtype="bf16")
    parts = [xent.score(x[i * n : (i + 1) * n], t[i * n : (i + 1) * n], device="cpu").summary for i in range(4)]
    one = xent.score(x, t, device="cpu").summary
    assert xent.merge(parts[::-1]) == one
    assert parts[2] + parts[0] + parts[3] + parts[1] == one


def test_merge_of_gpu_summaries(rng):
    from conftest import need_device

    need_device("gpu")
    x, t = scored(rng, rows=48, vocab=1000)
    g = [xent.score(x[a:b], t[a:b], device="gpu") for a, b in [(0, 20), (20, 48)]]
    m = g[0].summary + g[1].summary
    check_summary(m, np.concatenate([r.nll for r in g]), np.concatenate([r.correct for r in g]), t == -100)
    assert m.device == "merged"  # as `xent merge` writes it
    assert g[0].summary.device == "gpu"


def test_summary_equality_ignores_timing(rng):
    x, t = scored(rng, rows=64)
    a = xent.score(x, t, device="cpu").summary
    b = xent.score(x, t, device="cpu").summary
    assert a == b  # seconds differ; the sums do not
    assert not (a != b)
    c = xent.score(x[:32], t[:32], device="cpu").summary
    assert a != c


def test_summary_type_errors(rng):
    x, t = scored(rng, rows=20)
    s = xent.score(x, t, device="cpu").summary
    k = xent.kld(x, x, device="cpu").summary
    with pytest.raises(TypeError):
        s + 1  # noqa: B018
    with pytest.raises(TypeError):
        1 + s  # noqa: B018
    with pytest.raises(TypeError):
        s + "x"  # noqa: B018
    with pytest.raises(TypeError):
        s + k  # noqa: B018
    with pytest.raises((TypeError, ValueError)):
        xent.merge([s, k])
    with pytest.raises(TypeError):
        xent.merge([s, 3])
    assert (s == "summary") is False
    assert (s == 0) is False
