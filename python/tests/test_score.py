"""xent.score against a float64 numpy reference: dtypes, layouts, vocab sizes, ignore_index,
special values, input protocols (numpy, buffer protocol, DLPack) and every documented error."""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest

import xent
from conftest import (
    DTYPES,
    GPU_MAX_ROWS,
    TARGET_DTYPES,
    as_f64,
    check_score,
    make_logits,
    make_targets,
    need_device,
    ref_score,
)

# --------------------------------------------------------------------------------------------
# Values against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["NV", "BTV"])
def test_dtypes_and_layouts(device, dtype, layout, rng):
    shape = (37, 1000) if layout == "NV" else (3, 13, 1000)
    x = make_logits(rng, shape, dtype)
    t = make_targets(rng, shape[:-1], shape[-1])
    t.reshape(-1)[::5] = -100  # some ignored rows
    res = xent.score(x, t, device=device)
    assert res.device == device
    assert res.summary.device == device
    check_score(res, x, t)
    assert res.nll.shape == (37 if layout == "NV" else 39,)


@pytest.mark.parametrize("vocab", [1, 2, 3, 7, 16, 17, 255, 1000, 4099, 50257])
def test_vocab_sizes(device, vocab, rng):
    rows = 8 if (device == "gpu" and vocab > 4096) else (GPU_MAX_ROWS if vocab <= 4096 else 48)
    x = make_logits(rng, (rows, vocab), "f32")
    t = make_targets(rng, rows, vocab)
    check_score(xent.score(x, t, device=device), x, t)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_large_vocab_low_precision(dtype, rng):
    # 16-bit logits over a GPT-2 sized vocabulary: many exact ties, first index wins.
    x = make_logits(rng, (24, 50257), dtype, scale=4.0)
    t = make_targets(rng, 24, 50257)
    t[0] = int(np.argmax(as_f64(x[0])))  # at least one correct row
    res = xent.score(x, t, device="cpu")
    check_score(res, x, t)
    assert res.correct[0]


def test_vocab_one(device):
    x = np.array([[0.5], [-3.0], [1e4]], np.float32)
    t = np.zeros(3, np.int64)
    res = xent.score(x, t, device=device)
    assert np.all(res.nll == 0)
    np.testing.assert_allclose(res.lse, x[:, 0], rtol=1e-6)
    assert np.all(res.argmax == 0)
    assert np.all(res.correct)
    assert res.summary.tokens == 3 and res.summary.correct == 3
    assert res.summary.mean_nll == 0.0 and res.summary.perplexity == 1.0


def test_large_offsets_are_stable(device, rng):
    # Max-subtraction: logits around +-3e4 must not overflow exp.
    x = make_logits(rng, (16, 513), "f32")
    t = make_targets(rng, 16, 513)
    for shift in (30000.0, -30000.0):
        y = (x + np.float32(shift)).astype(np.float32)
        res = xent.score(y, t, device=device)
        ref = ref_score(y, t)
        assert np.all(np.isfinite(res.nll))
        np.testing.assert_allclose(res.nll, ref["nll"], atol=1e-4, rtol=1e-5)


def test_known_values():
    # Hand-computed: uniform row -> nll = log V; one-hot-ish row.
    x = np.array([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]], np.float32)
    t = np.array([2, 0])
    res = xent.score(x, t, device="cpu")
    assert res.nll[0] == pytest.approx(np.log(4.0), rel=1e-6)
    assert res.lse[0] == pytest.approx(np.log(4.0), rel=1e-6)
    assert res.nll[1] == pytest.approx(np.log1p(3 * np.exp(-10.0)), rel=1e-4, abs=1e-7)
    assert list(res.argmax) == [0, 0]
    assert list(res.correct) == [False, True]


def test_ties_first_index(device):
    x = np.array([[1, 3, 3, 0], [1, 3, 3, 0], [2, 2, 2, 2], [2, 2, 2, 2], [-1, 5, 0, 5]], np.float32)
    t = np.array([1, 2, 0, 3, 3])
    res = xent.score(x, t, device=device)
    assert list(res.argmax) == [1, 1, 0, 0, 1]
    assert list(res.correct) == [True, False, True, False, False]
    check_score(res, x, t)


@pytest.mark.parametrize("tdtype", TARGET_DTYPES, ids=lambda d: np.dtype(d).name)
def test_target_dtypes(tdtype, rng):
    x = make_logits(rng, (40, 100), "f32")
    t = make_targets(rng, 40, 100, tdtype)
    res = xent.score(x, t, device="cpu")
    check_score(res, x, t)
    # Same values as int64 targets.
    res64 = xent.score(x, t.astype(np.int64), device="cpu")
    np.testing.assert_array_equal(res.nll, res64.nll)


def test_target_dtype_gpu(rng):
    need_device("gpu")
    x = make_logits(rng, (20, 300), "bf16")
    t = make_targets(rng, (4, 5), 300, np.int16)
    check_score(xent.score(x.reshape(4, 5, 300), t, device="gpu"), x, t)


def test_gpu_and_cpu_agree(rng):
    need_device("gpu")
    x = make_logits(rng, (64, 4096), "f32")
    t = make_targets(rng, 64, 4096)
    t[3] = -100
    g = xent.score(x, t, device="gpu")
    c = xent.score(x, t, device="cpu")
    np.testing.assert_allclose(g.nll, c.nll, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(g.argmax, c.argmax)
    np.testing.assert_array_equal(g.correct, c.correct)
    assert g.summary.tokens == c.summary.tokens == 63


def test_auto_device(rng):
    x = make_logits(rng, (8, 64), "f32")
    t = make_targets(rng, 8, 64)
    res = xent.score(x, t)  # device="auto"
    assert res.device in ("cpu", "gpu")
    assert res.summary.device == res.device
    check_score(res, x, t)


# --------------------------------------------------------------------------------------------
# ignore_index
# --------------------------------------------------------------------------------------------


def test_ignore_index_default(device, rng):
    x = make_logits(rng, (30, 50), "f32")
    t = make_targets(rng, 30, 50)
    t[[0, 7, 29]] = -100
    res = xent.score(x, t, device=device)
    check_score(res, x, t)
    assert res.summary.ignored == 3 and res.summary.tokens == 27
    assert np.all(res.nll[[0, 7, 29]] == 0)
    assert not res.correct[[0, 7, 29]].any()


def test_ignore_index_custom_in_vocab(device, rng):
    # ignore_index=3: rows whose target is 3 are skipped even though 3 is a valid class.
    x = make_logits(rng, (40, 8), "f32")
    t = make_targets(rng, 40, 8)
    t[:4] = 3
    res = xent.score(x, t, device=device, ignore_index=3)
    check_score(res, x, t, ignore_index=3)
    assert res.summary.ignored == int((t == 3).sum())


def test_ignore_index_custom_negative(rng):
    x = make_logits(rng, (10, 8), "f32")
    t = make_targets(rng, 10, 8)
    t[2] = -1
    res = xent.score(x, t, device="cpu", ignore_index=-1)
    check_score(res, x, t, ignore_index=-1)
    assert res.summary.ignored == 1
    # With the default ignore_index, -1 is out of range.
    with pytest.raises(ValueError, match=r"row 2: target -1"):
        xent.score(x, t, device="cpu")
    # And -100 is out of range when ignore_index is -1.
    t[2] = -100
    with pytest.raises(ValueError, match=r"row 2: target -100"):
        xent.score(x, t, device="cpu", ignore_index=-1)


def test_ignore_index_unsigned_targets(rng):
    x = make_logits(rng, (10, 8), "f32")
    t = make_targets(rng, 10, 8, np.uint8)
    t[[1, 4]] = 255
    res = xent.score(x, t, device="cpu", ignore_index=255)
    check_score(res, x, t, ignore_index=255)
    assert res.summary.ignored == 2


def test_all_rows_ignored(device, rng):
    x = make_logits(rng, (5, 10), "f32")
    t = np.full(5, -100)
    res = xent.score(x, t, device=device)
    assert np.all(res.nll == 0)
    assert not res.correct.any()
    s = res.summary
    assert s.tokens == 0 and s.ignored == 5 and s.correct == 0
    assert s.mean_nll != s.mean_nll  # NaN: nothing scored


def test_zero_rows(device):
    x = np.zeros((0, 10), np.float32)
    t = np.zeros(0, np.int64)
    res = xent.score(x, t, device=device)
    assert res.nll.shape == (0,) and res.lse.shape == (0,)
    assert res.correct.shape == (0,) and res.argmax.shape == (0,)
    assert res.summary.tokens == 0 and res.summary.ignored == 0


# --------------------------------------------------------------------------------------------
# Special values (PyTorch semantics)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_special_values(device, dtype):
    v = 6
    base = np.tile(np.linspace(-2, 2, v, dtype=np.float32), (7, 1))
    base[0, 2] = np.nan  # NaN in the row -> NaN
    base[1, 4] = np.inf  # +inf in the row -> NaN
    base[2, 1] = -np.inf  # -inf at the target -> +inf
    base[3, 0] = -np.inf  # -inf elsewhere -> finite
    base[4, :] = -np.inf  # only -inf -> NaN
    base[5, 3] = np.nan  # NaN in an ignored row -> 0
    x = base.astype(DTYPES[dtype])
    t = np.array([1, 1, 1, 2, 0, -100, 5])
    res = xent.score(x, t, device=device)
    nll = res.nll
    assert np.isnan(nll[0]), nll
    assert np.isnan(nll[1]), nll
    assert nll[2] == np.inf, nll
    assert np.isfinite(nll[3]), nll
    assert np.isnan(nll[4]), nll
    assert nll[5] == 0, nll
    assert np.isfinite(nll[6]) and res.correct[6]
    assert not res.correct[[0, 1, 2, 4, 5]].any()
    check_score(res, x, t)
    s = res.summary
    assert (s.tokens, s.ignored, s.nan, s.infinite) == (6, 1, 3, 1)
    assert s.mean_nll != s.mean_nll  # NaN rows make the mean NaN


def test_infinite_only(device):
    x = np.array([[0.0, -np.inf, 1.0], [0.0, 1.0, 2.0]], np.float32)
    t = np.array([1, 2])
    res = xent.score(x, t, device=device)
    assert res.nll[0] == np.inf
    s = res.summary
    assert (s.nan, s.infinite, s.tokens, s.correct) == (0, 1, 2, 1)
    assert s.mean_nll == np.inf


# --------------------------------------------------------------------------------------------
# Memory: views, read-only arrays, memory maps
# --------------------------------------------------------------------------------------------


def test_contiguous_views_with_offset(device, rng):
    x = make_logits(rng, (20, 77), "f32")
    t = make_targets(rng, 20, 77)
    res = xent.score(x[5:12], t[5:12], device=device)
    check_score(res, x[5:12], t[5:12])
    x3 = make_logits(rng, (4, 6, 77), "bf16")
    t3 = make_targets(rng, (4, 6), 77)
    res = xent.score(x3[1:3], t3[1:3], device=device)
    check_score(res, x3[1:3], t3[1:3])


def test_read_only_and_memmap(tmp_path, rng):
    x = make_logits(rng, (12, 33), "f32")
    t = make_targets(rng, 12, 33)
    ro = x.copy()
    ro.setflags(write=False)
    tro = t.copy()
    tro.setflags(write=False)
    check_score(xent.score(ro, tro, device="cpu"), x, t)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    tm = np.load(tmp_path / "t.npy", mmap_mode="r")
    check_score(xent.score(xm, tm, device="cpu"), x, t)


def test_input_not_modified(rng):
    x = make_logits(rng, (9, 40), "f16")
    t = make_targets(rng, 9, 40)
    x0, t0 = x.copy(), t.copy()
    xent.score(x, t, device="cpu")
    assert x.tobytes() == x0.tobytes() and np.array_equal(t, t0)


# --------------------------------------------------------------------------------------------
# Other producers: buffer protocol and DLPack (torch-free)
# --------------------------------------------------------------------------------------------


class DLPackOnly:
    """Exposes an array only through DLPack (no buffer protocol, no __array_interface__)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, *args, **kwargs):
        return self._a.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_is_what_it_claims():
    d = DLPackOnly(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError):
        memoryview(d)
    assert not hasattr(d, "__array_interface__")
    assert np.from_dlpack(d).shape == (2, 3)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_dlpack_logits(device, dtype, rng):
    x = make_logits(rng, (2, 9, 130), dtype)
    t = make_targets(rng, (2, 9), 130)
    res = xent.score(DLPackOnly(x), t, device=device)
    check_score(res, x, t)


def test_dlpack_targets(rng):
    x = make_logits(rng, (11, 64), "f32")
    t = make_targets(rng, 11, 64, np.int32)
    res = xent.score(DLPackOnly(x), DLPackOnly(t), device="cpu")
    check_score(res, x, t)


def test_dlpack_non_contiguous():
    x = np.zeros((8, 16), np.float32)
    t = np.zeros(8, np.int64)
    with pytest.raises(ValueError, match="contiguous"):
        xent.score(DLPackOnly(x[:, ::2]), t, device="cpu")
    with pytest.raises(ValueError, match="contiguous"):
        xent.score(DLPackOnly(x.T), np.zeros(16, np.int64), device="cpu")


def test_buffer_protocol(rng):
    x = make_logits(rng, (6, 21), "f32")
    t = make_targets(rng, 6, 21)
    res = xent.score(memoryview(x), t, device="cpu")
    check_score(res, x, t)


# --------------------------------------------------------------------------------------------
# Errors: exception types and one-line messages
# --------------------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg.strip(), f"message is not one line: {msg!r}"
    return msg


@pytest.mark.parametrize(
    "view",
    [
        lambda x: x[:, ::2],
        lambda x: x[::2],
        lambda x: x.T,
        lambda x: np.asfortranarray(x),
        lambda x: x[:, 1:],
        lambda x: x[::-1],
        lambda x: np.broadcast_to(x[:1], x.shape),
    ],
    ids=["column-step", "row-step", "transpose", "fortran", "column-slice", "reversed", "broadcast"],
)
def test_non_contiguous_logits(view):
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    v = view(x)
    assert not v.flags.c_contiguous
    t = np.zeros(v.shape[0], np.int64)
    with pytest.raises(ValueError, match="contiguous") as e:
        xent.score(v, t, device="cpu")
    one_line(e)


def test_non_contiguous_3d_and_bf16():
    x = np.zeros((4, 6, 10), ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match="contiguous"):
        xent.score(x[:, ::2], np.zeros((4, 3), np.int64), device="cpu")
    with pytest.raises(ValueError, match="contiguous"):
        xent.score(x.transpose(1, 0, 2), np.zeros((6, 4), np.int64), device="cpu")


def test_non_contiguous_targets():
    x = np.zeros((4, 10), np.float32)
    t = np.zeros(8, np.int64)[::2]
    assert not t.flags.c_contiguous
    with pytest.raises(ValueError, match="contiguous"):
        xent.score(x, t, device="cpu")


@pytest.mark.parametrize(
    "logits",
    [
        np.zeros((3, 4), np.float64),
        np.zeros((3, 4), np.int32),
        np.zeros((3, 4), np.int64),
        np.zeros((3, 4), np.bool_),
        np.zeros((3, 4), np.complex64),
        np.zeros((3, 4), object),
        "not an array",
        None,
        12.5,
    ],
    ids=["float64", "int32", "int64", "bool", "complex64", "object", "str", "None", "float"],
)
def test_bad_logits_type(logits):
    with pytest.raises(TypeError) as e:
        xent.score(logits, np.zeros(3, np.int64), device="cpu")
    one_line(e)


def test_float64_message_names_dtype():
    with pytest.raises(TypeError) as e:
        xent.score(np.zeros((3, 4)), np.zeros(3, np.int64), device="cpu")
    msg = one_line(e)
    assert "float64" in msg or "f64" in msg or "<f8" in msg, msg


@pytest.mark.parametrize(
    "targets",
    [np.zeros(3, np.float32), np.zeros(3, np.float64), np.zeros(3, object), "abc", None, np.zeros(3, np.complex64)],
    ids=["float32", "float64", "object", "str", "None", "complex"],
)
def test_bad_targets_type(targets):
    with pytest.raises(TypeError) as e:
        xent.score(np.zeros((3, 4), np.float32), targets, device="cpu")
    one_line(e)


@pytest.mark.parametrize(
    "xshape,tshape",
    [
        ((12,), (12,)),  # rank-1 logits
        ((2, 2, 3, 4), (2, 2, 3)),  # rank-4 logits
        ((3, 0), (3,)),  # vocab 0
        ((3, 4), (4,)),  # row count mismatch
        ((3, 4), (2,)),
        ((2, 3, 4), (6, 1)),  # [B, T] of the wrong shape
        ((2, 3, 4), (3, 2)),
        ((3, 4), (3, 1, 1)),  # rank-3 targets
        ((3, 4), ()),  # scalar targets
        ((), (1,)),  # scalar logits
    ],
)
def test_bad_shapes(xshape, tshape):
    x = np.zeros(xshape, np.float32)
    t = np.zeros(tshape, np.int64)
    with pytest.raises(ValueError) as e:
        xent.score(x, t, device="cpu")
    one_line(e)


def test_row_mismatch_message():
    with pytest.raises(ValueError, match=r"3 rows.*4|4.*3 rows") as e:
        xent.score(np.zeros((3, 4), np.float32), np.zeros(4, np.int64), device="cpu")
    one_line(e)


def test_target_out_of_range_message(device):
    x = np.zeros((5, 16), np.float32)
    t = np.array([0, 1, 15, 50, 2])
    with pytest.raises(ValueError, match=r"row 3: target 50 is outside the vocabulary of 16") as e:
        xent.score(x, t, device=device)
    one_line(e)
    t = np.array([0, 16, 0, 0, 0], np.uint8)
    with pytest.raises(ValueError, match=r"row 1: target 16 is outside the vocabulary of 16"):
        xent.score(x, t, device=device)
    t = np.array([0, 0, 0, 0, -7], np.int32)
    with pytest.raises(ValueError, match=r"row 4: target -7 is outside the vocabulary of 16"):
        xent.score(x, t, device=device)


def test_target_out_of_range_3d_counts_flat_rows():
    x = np.zeros((2, 3, 4), np.float32)
    t = np.zeros((2, 3), np.int64)
    t[1, 2] = 4
    with pytest.raises(ValueError, match=r"row 5: target 4 is outside the vocabulary of 4"):
        xent.score(x, t, device="cpu")


def test_bad_device():
    x, t = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="tpu"):
        xent.score(x, t, device="tpu")


def test_keyword_only():
    x, t = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    with pytest.raises(TypeError):
        xent.score(x, t, "cpu")  # type: ignore[misc]
    with pytest.raises(TypeError):
        xent.score(x)  # type: ignore[call-arg]


def test_errors_leave_module_usable(rng):
    # A burst of failures, then a good call: nothing is left in a bad state.
    for bad in (np.zeros((2, 3)), np.zeros((2, 3), np.float32)[:, ::2], np.zeros(3, np.float32)):
        with pytest.raises((TypeError, ValueError)):
            xent.score(bad, np.zeros(2, np.int64), device="cpu")
    x = make_logits(rng, (4, 9), "f32")
    t = make_targets(rng, 4, 9)
    check_score(xent.score(x, t, device="cpu"), x, t)


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------


def test_concurrent_calls(rng):
    x = make_logits(rng, (64, 2000), "bf16")
    t = make_targets(rng, 64, 2000)
    want = xent.score(x, t, device="cpu")
    out: list = [None] * 6
    errors: list = []

    def work(i):
        try:
            out[i] = xent.score(x, t, device="cpu")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for r in out:
        np.testing.assert_array_equal(r.nll, want.nll)
        assert r.summary == want.summary


def test_non_native_byte_order_is_refused_or_right(rng):
    # Big-endian data must never be read as little-endian garbage: a TypeError, or right values.
    x = make_logits(rng, (6, 20), "f32")
    t = make_targets(rng, 6, 20)
    for xx, tt in ((x.astype(">f4"), t), (x, t.astype(">i8")), (x.astype(">f2"), t.astype(">i4"))):
        try:
            res = xent.score(xx, tt, device="cpu")
        except TypeError as e:
            assert "byte order" in str(e) or "endian" in str(e), str(e)
            continue
        check_score(res, xx.astype(xx.dtype.newbyteorder("=")), tt)


def unaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` whose data starts one byte past an aligned address."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert out.flags.c_contiguous and not out.flags.aligned
    return out


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_unaligned_logits(device, dtype, rng):
    # Logits are bytes to xent: any address works, on every path (or a clean ValueError).
    x = make_logits(rng, (5, 333), dtype)
    t = make_targets(rng, 5, 333)
    xu = unaligned(x)
    try:
        res = xent.score(xu, t, device=device)
    except ValueError as e:
        assert "align" in str(e), str(e)
        return
    check_score(res, x, t)


def test_unaligned_targets(rng):
    x = make_logits(rng, (5, 33), "f32")
    for dt in (np.int64, np.int32, np.uint32, np.int16):
        t = make_targets(rng, 5, 33, dt)
        tu = unaligned(t)
        try:
            res = xent.score(x, tu, device="cpu")
        except ValueError as e:
            assert "align" in str(e), str(e)
            continue
        check_score(res, x, t)


def test_uint64_targets(rng):
    x = make_logits(rng, (5, 33), "f32")
    t = make_targets(rng, 5, 33, np.uint64)
    try:
        res = xent.score(x, t, device="cpu")
    except TypeError:
        pytest.skip("uint64 targets are not accepted (not in the documented list)")
    check_score(res, x, t)
    t[3] = 2**63 + 5
    with pytest.raises(ValueError, match="row 3"):
        xent.score(x, t, device="cpu")


def test_dlpack_on_another_device_is_refused():
    class OnCuda(DLPackOnly):
        def __dlpack_device__(self):
            return (2, 0)  # kDLCUDA

    with pytest.raises(TypeError, match="CPU"):
        xent.score(OnCuda(np.zeros((2, 3), np.float32)), np.zeros(2, np.int64), device="cpu")


def test_dlpack_bad_exporters():
    class Broken:
        def __dlpack__(self, *a, **k):
            raise RuntimeError("exporter failed")

        def __dlpack_device__(self):
            return (1, 0)

    class NotACapsule(Broken):
        def __dlpack__(self, *a, **k):
            return 42

    for obj in (Broken(), NotACapsule()):
        with pytest.raises(TypeError):
            xent.score(obj, np.zeros(2, np.int64), device="cpu")
