"""xent.score_files: .npy and .safetensors shards (written here), globs, directories, lists, shift,
per-token and per-sequence results, offsets, chunking, file errors, and the CLI's own summary."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import xent
from conftest import (
    ATOL,
    RTOL,
    assert_close,
    check_summary,
    make_logits,
    make_targets,
    need_device,
    ref_score,
    merged_dict,
    summary_dict,
    write_npy,
    write_safetensors,
    xent_bin,
)


def shift_reference(x, labels, ignore_index=-100):
    """Scores position t of each sequence against label t+1; the last position is dropped."""
    b, t, v = x.shape
    xs = x[:, :-1, :].reshape(-1, v)
    ts = labels[:, 1:].reshape(-1)
    return xs, ts, ref_score(xs, ts, ignore_index)


def check_files_summary(s, x, t, ignore_index=-100):
    """A summary of files against the reference of the same rows (values to tolerance, counts exact)."""
    ref = ref_score(x, t, ignore_index)
    scored = ~ref["ignored"]
    assert s.tokens == int(scored.sum())
    assert s.ignored == int(ref["ignored"].sum())
    assert s.correct == int(ref["correct"].sum())
    want = ref["nll"][scored].mean()
    assert abs(s.mean_nll - want) <= ATOL + RTOL * abs(want), (s.mean_nll, want)
    return ref


# --------------------------------------------------------------------------------------------
# Formats and dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ldtype", ["f32", "f16"])
@pytest.mark.parametrize("tdtype", [np.int64, np.int32, np.uint32], ids=["i8", "i4", "u4"])
def test_npy(tmp_path, rng, ldtype, tdtype):
    x = make_logits(rng, (90, 300), ldtype)
    t = make_targets(rng, 90, 300, tdtype)
    if np.dtype(tdtype).kind == "i":
        t[::7] = -100
    lp, tp = write_npy(tmp_path / "l.npy", x), write_npy(tmp_path / "t.npy", t)
    s = xent.score_files(lp, tp, device="cpu")
    assert isinstance(s, xent.Summary)
    assert s.device == "cpu"
    check_files_summary(s, x, t)
    # str paths and pathlib paths alike; the in-memory call gives the same counts and mean.
    s2 = xent.score_files(str(lp), str(tp), device="cpu")
    assert s2 == s
    mem = xent.score(x, t, device="cpu").summary
    assert (mem.tokens, mem.ignored, mem.correct) == (s.tokens, s.ignored, s.correct)
    assert mem.mean_nll == pytest.approx(s.mean_nll, rel=1e-6)


@pytest.mark.parametrize("ldtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("tdtype", [np.int64, np.int32, np.uint32], ids=["I64", "I32", "U32"])
def test_safetensors(tmp_path, rng, ldtype, tdtype):
    x = make_logits(rng, (4, 20, 256), ldtype)
    t = make_targets(rng, (4, 20), 256, tdtype)
    lp = write_safetensors(tmp_path / "l.safetensors", {"logits": x})
    tp = write_safetensors(tmp_path / "t.safetensors", {"targets": t})
    r = xent.score_files(lp, tp, device="cpu", per_token=True)
    assert isinstance(r, xent.FilesResult)
    ref = check_files_summary(r.summary, x, t)
    assert r.nll.dtype == np.float32 and r.nll.shape == (80,)
    assert_close(r.nll, ref["nll"], what="nll")
    assert_close(r.lse, ref["lse"], what="lse")
    np.testing.assert_array_equal(np.asarray(r.correct, bool), ref["correct"])
    check_summary(r.summary, r.nll, r.correct, ref["ignored"])


def test_safetensors_several_tensors_and_keys(tmp_path, rng):
    x = make_logits(rng, (30, 64), "bf16")
    x2 = make_logits(rng, (30, 64), "f32")
    t = make_targets(rng, 30, 64)
    labels = make_targets(rng, 30, 64, np.int32)
    # 8-byte tensors first so every tensor stays aligned (the format has no gaps).
    both = write_safetensors(tmp_path / "both.safetensors", {"targets": t, "other": x2, "logits": x})
    s = xent.score_files(both, both, device="cpu")  # defaults: "logits" and "targets"
    check_files_summary(s, x, t)
    s = xent.score_files(both, both, device="cpu", logits_key="other")
    check_files_summary(s, x2, t)
    lab = write_safetensors(tmp_path / "lab.safetensors", {"ids": t, "labels": labels})
    s = xent.score_files(both, lab, device="cpu")  # "labels" is a default targets key
    check_files_summary(s, x, labels)
    s = xent.score_files(both, lab, device="cpu", targets_key="ids")
    check_files_summary(s, x, t)
    with pytest.raises(ValueError, match="nope"):
        xent.score_files(both, lab, device="cpu", logits_key="nope")


def test_mixed_formats_and_metadata(tmp_path, rng):
    x = make_logits(rng, (25, 100), "f16")
    t = make_targets(rng, 25, 100, np.int32)
    lp = write_safetensors(tmp_path / "l.safetensors", {"logits": x}, metadata={"format": "pt"})
    tp = write_npy(tmp_path / "t.npy", t)
    check_files_summary(xent.score_files(lp, tp, device="cpu"), x, t)


# --------------------------------------------------------------------------------------------
# Shards: lists, globs, directories
# --------------------------------------------------------------------------------------------


def write_shards(tmp_path, rng, n=3, rows=(40, 25, 33), vocab=200, dtype="f32", fmt="npy"):
    (tmp_path / "L").mkdir()
    (tmp_path / "T").mkdir()
    xs, ts, lps, tps = [], [], [], []
    for i in range(n):
        x = make_logits(rng, (rows[i], vocab), dtype)
        t = make_targets(rng, rows[i], vocab)
        t[i::6] = -100
        if fmt == "npy":
            lps.append(write_npy(tmp_path / "L" / f"logits-{i}.npy", x))
        else:
            lps.append(write_safetensors(tmp_path / "L" / f"logits-{i}.safetensors", {"logits": x}))
        tps.append(write_npy(tmp_path / "T" / f"targets-{i}.npy", t))
        xs.append(x)
        ts.append(t)
    return xs, ts, lps, tps


def test_lists_globs_directories(tmp_path, rng):
    xs, ts, lps, tps = write_shards(tmp_path, rng)
    x, t = np.concatenate(xs), np.concatenate(ts)
    want = xent.score_files([str(p) for p in lps], [Path(p) for p in tps], device="cpu")
    check_files_summary(want, x, t)
    assert want.tokens + want.ignored == 98
    by_glob = xent.score_files(str(tmp_path / "L" / "logits-*.npy"), str(tmp_path / "T" / "targets-?.npy"), device="cpu")
    by_dir = xent.score_files(tmp_path / "L", str(tmp_path / "T"), device="cpu")
    mixed = xent.score_files([lps[0], str(tmp_path / "L" / "logits-[12].npy")], tmp_path / "T", device="cpu")
    for s in (by_glob, by_dir, mixed):
        assert s == want
        assert summary_dict(s) == summary_dict(want)


def test_shard_summaries_merge_exactly(tmp_path, rng):
    xs, ts, lps, tps = write_shards(tmp_path, rng, dtype="bf16", fmt="safetensors")
    whole = xent.score_files(lps, tps, device="cpu")
    parts = [xent.score_files(lp, tp, device="cpu") for lp, tp in zip(lps, tps)]
    assert xent.merge(parts) == whole
    assert sum(parts) == whole
    assert merged_dict(xent.merge(parts)) == merged_dict(whole)
    assert xent.merge(parts).device == "merged"


def test_shard_order_is_by_name(tmp_path, rng):
    # Per-token results come in sorted-name order whatever the creation order.
    xs, ts, lps, tps = write_shards(tmp_path, rng, rows=(10, 11, 12))
    r = xent.score_files(tmp_path / "L", tmp_path / "T", device="cpu", per_token=True)
    ref = ref_score(np.concatenate(xs), np.concatenate(ts))
    assert_close(r.nll, ref["nll"], what="nll")


def test_shards_that_disagree(tmp_path, rng):
    a = write_npy(tmp_path / "a.npy", make_logits(rng, (5, 10), "f32"))
    b = write_npy(tmp_path / "b.npy", make_logits(rng, (5, 12), "f32"))  # another vocab
    c = write_npy(tmp_path / "c.npy", make_logits(rng, (5, 10), "f16"))  # another dtype
    t = write_npy(tmp_path / "t.npy", make_targets(rng, 5, 10))
    with pytest.raises(ValueError, match="b.npy"):
        xent.score_files([a, b], [t, t], device="cpu")
    with pytest.raises(ValueError, match="c.npy"):
        xent.score_files([a, c], [t, t], device="cpu")
    with pytest.raises(ValueError):  # two logits files, one targets file
        xent.score_files([a, a], [t], device="cpu")


# --------------------------------------------------------------------------------------------
# shift, per-token, per-sequence, offsets
# --------------------------------------------------------------------------------------------


def test_shift(tmp_path, rng):
    x = make_logits(rng, (3, 17, 120), "f32")
    labels = make_targets(rng, (3, 17), 120)
    labels[1, 5] = -100
    labels[2, 0] = -100  # never a target under shift (position 0 is only an input)
    lp, tp = write_npy(tmp_path / "l.npy", x), write_npy(tmp_path / "t.npy", labels)
    r = xent.score_files(lp, tp, device="cpu", shift=True, per_token=True)
    xs, tsh, ref = shift_reference(x, labels)
    assert r.summary.tokens == 3 * 16 - 1
    assert r.summary.ignored == 1  # dropped last positions are not "ignored"
    assert r.nll.shape == (48,)
    assert_close(r.nll, ref["nll"], what="shifted nll")
    check_summary(r.summary, r.nll, r.correct, ref["ignored"])
    plain = xent.score_files(lp, tp, device="cpu")
    assert plain.tokens == 51 - 2 and plain != r.summary


def test_shift_flat_shards_are_sequences(tmp_path, rng):
    # [N, V] logits: each shard is one sequence, so each shard loses its own last row.
    xs, ts, lps, tps = write_shards(tmp_path, rng, rows=(9, 14, 6), vocab=50)
    r = xent.score_files(lps, tps, device="cpu", shift=True, per_token=True)
    want_x = np.concatenate([x[:-1] for x in xs])
    want_t = np.concatenate([t[1:] for t in ts])
    ref = ref_score(want_x, want_t)
    assert r.nll.shape == (26,)
    assert_close(r.nll, ref["nll"], what="nll")
    assert r.summary.tokens == int((want_t != -100).sum())


def test_per_sequence_btv(tmp_path, rng):
    x = make_logits(rng, (5, 12, 40), "bf16", scale=6.0)
    t = make_targets(rng, (5, 12), 40)
    t[0, :] = -100  # a sequence with nothing scored
    t[1, 3] = -100
    # Sequence 2 is greedy: every target is the argmax.
    t[2] = np.argmax(x[2].astype(np.float32), axis=-1)
    lp = write_safetensors(tmp_path / "l.safetensors", {"logits": x})
    tp = write_npy(tmp_path / "t.npy", t)
    r = xent.score_files(lp, tp, device="cpu", per_sequence=True)
    assert isinstance(r, xent.FilesResult)
    ref = ref_score(x, t)
    nll = ref["nll"].reshape(5, 12)
    ign = ref["ignored"].reshape(5, 12)
    corr = ref["correct"].reshape(5, 12)
    assert r.seq_tokens.dtype == np.int64 and r.seq_sum_logprob.dtype == np.float64
    assert r.seq_is_greedy.dtype == np.bool_
    np.testing.assert_array_equal(r.seq_tokens, (~ign).sum(axis=1))
    np.testing.assert_allclose(r.seq_sum_logprob, -nll.sum(axis=1), atol=1e-4, rtol=1e-5)
    want_greedy = np.array([np.all(corr[i][~ign[i]]) for i in range(5)])
    np.testing.assert_array_equal(r.seq_is_greedy, want_greedy)
    assert r.seq_is_greedy[2] and r.seq_is_greedy[0] and r.seq_tokens[0] == 0
    check_files_summary(r.summary, x, t)


def test_per_sequence_with_offsets(tmp_path, rng):
    x = make_logits(rng, (20, 30), "f32")
    t = make_targets(rng, 20, 30)
    lp, tp = write_npy(tmp_path / "l.npy", x), write_npy(tmp_path / "t.npy", t)
    offsets = np.array([0, 4, 4, 11, 20])
    ref = ref_score(x, t)
    for off in (offsets, offsets.astype(np.uint32), write_npy(tmp_path / "o.npy", offsets), str(tmp_path / "o.npy")):
        r = xent.score_files(lp, tp, device="cpu", per_sequence=True, per_token=True, offsets=off)
        np.testing.assert_array_equal(r.seq_tokens, [4, 0, 7, 9])
        want = [-ref["nll"][a:b].sum() for a, b in zip(offsets, offsets[1:])]
        np.testing.assert_allclose(r.seq_sum_logprob, want, atol=1e-4, rtol=1e-5)
        assert_close(r.nll, ref["nll"], what="nll")
    # Shift within the offset spans: each span drops its last row.
    r = xent.score_files(lp, tp, device="cpu", per_sequence=True, shift=True, offsets=offsets)
    np.testing.assert_array_equal(r.seq_tokens, [3, 0, 6, 8])
    for bad in ([0, 4, 19], [1, 4, 20], [0, 12, 4, 20]):
        with pytest.raises(ValueError, match="offsets"):
            xent.score_files(lp, tp, device="cpu", per_sequence=True, offsets=np.array(bad))


def test_offsets_as_a_list(tmp_path, rng):
    # The stub types offsets as `Paths | npt.ArrayLike`: a plain list of ints is array-like.
    x = make_logits(rng, (10, 8), "f32")
    t = make_targets(rng, 10, 8)
    lp, tp = write_npy(tmp_path / "l.npy", x), write_npy(tmp_path / "t.npy", t)
    r = xent.score_files(lp, tp, device="cpu", per_sequence=True, offsets=[0, 3, 10])
    np.testing.assert_array_equal(r.seq_tokens, [3, 7])


def test_per_sequence_needs_sequences(tmp_path, rng):
    lp = write_npy(tmp_path / "l.npy", make_logits(rng, (6, 5), "f32"))
    tp = write_npy(tmp_path / "t.npy", make_targets(rng, 6, 5))
    with pytest.raises(ValueError):
        xent.score_files(lp, tp, device="cpu", per_sequence=True)


def test_chunking_does_not_change_results(tmp_path, rng):
    # 384 rows of 2048 f32 = 3 MiB: three chunks of exactly 128 rows at chunk_mib=1.
    x = make_logits(rng, (384, 2048), "f32")
    t = make_targets(rng, 384, 2048)
    t[::11] = -100
    lp, tp = write_npy(tmp_path / "l.npy", x), write_npy(tmp_path / "t.npy", t)
    big = xent.score_files(lp, tp, device="cpu", per_token=True)
    small = xent.score_files(lp, tp, device="cpu", per_token=True, chunk_mib=1)
    np.testing.assert_array_equal(big.nll, small.nll)
    assert big.summary == small.summary
    ref = check_files_summary(big.summary, x, t)
    assert_close(big.nll, ref["nll"], what="nll")


def test_ignore_index_in_files(tmp_path, rng):
    x = make_logits(rng, (30, 10), "f32")
    t = make_targets(rng, 30, 10)
    lp, tp = write_npy(tmp_path / "l.npy", x), write_npy(tmp_path / "t.npy", t)
    s = xent.score_files(lp, tp, device="cpu", ignore_index=4)
    check_files_summary(s, x, t, ignore_index=4)
    assert s.ignored == int((t == 4).sum())


def test_progress_flag_is_harmless(tmp_path, rng):
    lp = write_npy(tmp_path / "l.npy", make_logits(rng, (8, 16), "f32"))
    tp = write_npy(tmp_path / "t.npy", make_targets(rng, 8, 16))
    assert xent.score_files(lp, tp, device="cpu", progress=True).tokens == 8


def test_files_on_gpu(tmp_path, rng):
    need_device("gpu")
    x = make_logits(rng, (2, 24, 1000), "bf16")
    t = make_targets(rng, (2, 24), 1000)
    lp = write_safetensors(tmp_path / "l.safetensors", {"logits": x})
    tp = write_npy(tmp_path / "t.npy", t)
    r = xent.score_files(lp, tp, device="gpu", per_token=True, per_sequence=True, shift=True)
    assert r.summary.device == "gpu"
    xs, tsh, ref = shift_reference(x, t)
    assert_close(r.nll, ref["nll"], what="gpu nll")
    check_summary(r.summary, r.nll, r.correct, ref["ignored"])
    np.testing.assert_allclose(r.seq_sum_logprob, -ref["nll"].reshape(2, 23).sum(axis=1), atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path, rng):
    tp = write_npy(tmp_path / "t.npy", make_targets(rng, 4, 4))
    missing = tmp_path / "missing.npy"
    with pytest.raises(OSError, match="missing.npy") as e:
        xent.score_files(missing, tp, device="cpu")
    assert isinstance(e.value, FileNotFoundError), type(e.value)


def test_glob_matching_nothing(tmp_path, rng):
    tp = write_npy(tmp_path / "t.npy", make_targets(rng, 4, 4))
    with pytest.raises((OSError, ValueError), match="nothing-"):
        xent.score_files(str(tmp_path / "nothing-*.npy"), tp, device="cpu")


def test_empty_directory(tmp_path, rng):
    (tmp_path / "empty").mkdir()
    tp = write_npy(tmp_path / "t.npy", make_targets(rng, 4, 4))
    with pytest.raises((OSError, ValueError), match="empty"):
        xent.score_files(tmp_path / "empty", tp, device="cpu")


def test_corrupt_files(tmp_path, rng):
    x = make_logits(rng, (6, 8), "f32")
    t = make_targets(rng, 6, 8)
    lp, tp = write_npy(tmp_path / "l.npy", x), write_npy(tmp_path / "t.npy", t)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"this is not an npy file at all" * 4)
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(lp.read_bytes()[:-10])
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\xff" * 8 + b"{}")
    absurd = tmp_path / "absurd.safetensors"
    absurd.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    for p in (garbage, truncated, bad_st, absurd, empty):
        with pytest.raises(ValueError, match=p.name) as e:
            xent.score_files(p, tp, device="cpu")
        assert "\n" not in str(e.value).strip()
    with pytest.raises(ValueError, match="truncated.npy"):
        xent.score_files(lp, truncated, device="cpu")


def test_wrong_extension(tmp_path, rng):
    lp = write_npy(tmp_path / "l.npy", make_logits(rng, (6, 8), "f32"))
    other = tmp_path / "l.bin"
    other.write_bytes(lp.read_bytes())
    tp = write_npy(tmp_path / "t.npy", make_targets(rng, 6, 8))
    with pytest.raises(ValueError, match="l.bin"):
        xent.score_files(other, tp, device="cpu")


def test_wrong_dtypes_in_files(tmp_path, rng):
    tp = write_npy(tmp_path / "t.npy", make_targets(rng, 6, 8))
    f64 = write_npy(tmp_path / "f64.npy", np.zeros((6, 8)))
    i32 = write_npy(tmp_path / "i32.npy", np.zeros((6, 8), np.int32))
    st64 = write_safetensors(tmp_path / "f64.safetensors", {"logits": np.zeros((6, 8))})
    for p in (f64, i32, st64):
        with pytest.raises((TypeError, ValueError), match=p.name):
            xent.score_files(p, tp, device="cpu")
    lp = write_npy(tmp_path / "l.npy", make_logits(rng, (6, 8), "f32"))
    ft = write_npy(tmp_path / "ft.npy", np.zeros(6, np.float32))
    i16 = write_npy(tmp_path / "i16.npy", np.zeros(6, np.int16))
    for p in (ft, i16):
        with pytest.raises((TypeError, ValueError), match=p.name):
            xent.score_files(lp, p, device="cpu")


def test_fortran_order_npy(tmp_path, rng):
    x = np.asfortranarray(make_logits(rng, (6, 8), "f32"))
    p = tmp_path / "fortran.npy"
    np.save(p, x)
    tp = write_npy(tmp_path / "t.npy", make_targets(rng, 6, 8))
    with pytest.raises(ValueError, match="fortran.npy"):
        xent.score_files(p, tp, device="cpu")


def test_bad_targets_in_files(tmp_path, rng):
    lp = write_npy(tmp_path / "l.npy", make_logits(rng, (6, 8), "f32"))
    t = make_targets(rng, 6, 8)
    t[4] = 9
    tp = write_npy(tmp_path / "targets.npy", t)
    with pytest.raises(ValueError, match=r"targets.npy.*row 4: target 9 is outside the vocabulary of 8"):
        xent.score_files(lp, tp, device="cpu")
    short = write_npy(tmp_path / "short.npy", make_targets(rng, 5, 8))
    with pytest.raises(ValueError, match="short.npy"):
        xent.score_files(lp, short, device="cpu")
    l3 = write_npy(tmp_path / "l3.npy", make_logits(rng, (2, 3, 8), "f32"))
    t32 = write_npy(tmp_path / "t32.npy", make_targets(rng, (3, 2), 8))
    with pytest.raises(ValueError, match="t32.npy"):
        xent.score_files(l3, t32, device="cpu")


# --------------------------------------------------------------------------------------------
# The CLI writes the same summary
# --------------------------------------------------------------------------------------------


def run_cli(args):
    exe = xent_bin()
    if exe is None:
        pytest.skip("no xent binary: build it (cargo build --release) or set XENT_BIN to compare with the CLI")
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"xent {' '.join(map(str, args))} failed: {p.stderr}"
    return p


def test_same_summary_as_cli(tmp_path, rng):
    x = make_logits(rng, (4, 50, 3000), "bf16")
    t = make_targets(rng, (4, 50), 3000)
    t[:, ::13] = -100
    lp = write_safetensors(tmp_path / "logits.safetensors", {"logits": x})
    tp = write_npy(tmp_path / "targets.npy", t.astype(np.int32))
    out = tmp_path / "summary.json"
    seq = tmp_path / "seq.jsonl"
    tok = tmp_path / "tok.npy"
    run_cli(["score", "--logits", lp, "--targets", tp, "--device", "cpu", "--shift", "--quiet",
             "--summary-out", out, "--per-sequence", seq, "--per-token", tok])  # fmt: skip
    cli_text = out.read_text()
    cli = json.loads(cli_text)
    r = xent.score_files(lp, tp, device="cpu", shift=True, per_token=True, per_sequence=True)
    mine = json.loads(r.summary.to_json())
    assert list(mine) == list(cli)
    for k in cli:
        if k != "seconds":
            assert mine[k] == cli[k], f"{k}: python {mine[k]!r}, CLI {cli[k]!r}"
    assert xent.Summary.from_json(cli_text) == r.summary
    np.testing.assert_array_equal(r.nll, np.load(tok))
    lines = [json.loads(line) for line in seq.read_text().splitlines() if line.strip()]
    assert len(lines) == 4
    assert [line["tokens"] for line in lines] == list(r.seq_tokens)
    np.testing.assert_allclose([line["sum_logprob"] for line in lines], r.seq_sum_logprob, rtol=1e-12, atol=0)
    assert [line["is_greedy"] for line in lines] == list(r.seq_is_greedy)


def test_merge_with_cli_shards(tmp_path, rng):
    # A shard scored by the CLI and one scored from Python merge exactly to the one-run summary.
    xs, ts, lps, tps = write_shards(tmp_path, rng, n=2, rows=(70, 70), vocab=500)
    out = tmp_path / "s0.json"
    run_cli(["score", "--logits", lps[0], "--targets", tps[0], "--device", "cpu", "--quiet", "--summary-out", out])
    a = xent.Summary.from_json(out.read_text())
    b = xent.score_files(lps[1], tps[1], device="cpu")
    whole = xent.score_files(lps, tps, device="cpu")
    assert a + b == whole
    assert merged_dict(xent.merge([a, b])) == merged_dict(whole)
