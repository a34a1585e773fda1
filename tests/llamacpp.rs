//! llama.cpp base files: read llama.cpp's own file, write one equal to it, score against it to
//! llama.cpp's printed numbers, and reject bad files without allocating what their header claims.
//!
//! The fixture (`tests/fixtures/llamacpp`) is llama.cpp's output on two tiny models; its README
//! says what each file is.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use xent::kld::{KldRow, NO_TARGET};
use xent::llamacpp::{self, BaseFile, BaseWriter, Record};

// ---------------------------------------------------------------------------------------------
// The largest single allocation made by the current thread, to show that absurd headers are
// rejected before anything is allocated from them.

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the thread-local bookkeeping
// neither allocates nor panics (`try_with` fails quietly during thread teardown).
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns its result with the largest allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// The fixture, kept in the repository (tests/fixtures/llamacpp) so that every clone runs these tests.
fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llamacpp")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xent-llamacpp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn f32_npy(path: &Path) -> (Vec<f32>, Vec<usize>) {
    let t = xent::io::open(path, None, &[]).unwrap();
    assert_eq!(t.elem, xent::io::ElemType::F32, "{}", t.name);
    let v = t.bytes().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (v, t.shape.clone())
}

fn int_npy(path: &Path) -> (Vec<i64>, Vec<usize>) {
    let t = xent::io::open(path, None, &[]).unwrap();
    let targets = t.targets().unwrap();
    ((0..targets.len()).map(|i| targets.get(i)).collect(), t.shape.clone())
}

/// Whether `got` is within `atol + rtol·|want|` of `want`.
fn close(got: f64, want: f64, atol: f64, rtol: f64) -> bool {
    (got - want).abs() <= atol + rtol * want.abs()
}

/// The error message of `r`, which must be an error.
fn err_of<T: std::fmt::Debug>(r: xent::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

// ---------------------------------------------------------------------------------------------
// Reading llama.cpp's file.

#[test]
fn reads_llama_cpp_file() {
    let dir = fixture_dir();
    let base = BaseFile::open(&dir.join("A.kld")).unwrap();
    assert_eq!((base.n_ctx(), base.n_vocab(), base.n_chunk()), (64, 4093, 4));
    assert_eq!((base.records_per_chunk(), base.records()), (31, 124));
    let (tokens, shape) = int_npy(&dir.join("tokens.npy"));
    assert_eq!(shape, [4, 64]);
    let got: Vec<i64> = base.tokens().iter().map(|&t| i64::from(t)).collect();
    assert_eq!(got, tokens);
    let (targets, _) = int_npy(&dir.join("targets.npy"));
    assert_eq!(targets.len(), 124);
    for (i, &t) in targets.iter().enumerate() {
        assert_eq!(i64::from(base.target(i)), t, "target of record {i}");
    }
    // Each record is a log-softmax: its maximum level is 65535 (at log p = max − lse ≤ 0), and
    // its probabilities sum to about 1.
    let mut lp = vec![0f32; base.n_vocab()];
    for i in 0..base.records() {
        let rec = base.record(i);
        assert_eq!(rec.q.len(), 4093);
        assert_eq!(rec.q.iter().max(), Some(&65535), "record {i}");
        llamacpp::dequantise(&rec, &mut lp).unwrap();
        let total: f64 = lp.iter().map(|&l| f64::from(l).exp()).sum();
        assert!(close(total, 1.0, 1e-3, 0.0), "record {i}: probabilities sum to {total}");
    }
}

// ---------------------------------------------------------------------------------------------
// Writing a file equal to llama.cpp's.

#[test]
fn writes_llama_cpp_file() {
    let dir = fixture_dir();
    let theirs = BaseFile::open(&dir.join("A.kld")).unwrap();
    let (a, shape) = f32_npy(&dir.join("A_logits.npy"));
    assert_eq!(shape, [124, 4093]);
    let (n_chunk, n_ctx, v) = (4usize, 64usize, 4093usize);
    let mut full = vec![0f32; n_chunk * n_ctx * v];
    for c in 0..n_chunk {
        for j in 0..31 {
            let src = &a[(c * 31 + j) * v..(c * 31 + j + 1) * v];
            let at = (c * n_ctx + 32 + j) * v;
            full[at..at + v].copy_from_slice(src);
        }
    }
    let d = tmp("write");
    let logits_path = d.join("logits.npy");
    xent::io::write_npy(&logits_path, "<f4", &[n_chunk, n_ctx, v], bytemuck::cast_slice(&full)).unwrap();
    let logits = xent::io::open(&logits_path, None, &[]).unwrap();
    let tokens = xent::io::open(&dir.join("tokens.npy"), None, &[]).unwrap();
    let out = d.join("ours.kld");
    llamacpp::write_base_file(&logits, &tokens, &out).unwrap();

    let ours_bytes = std::fs::read(&out).unwrap();
    let theirs_bytes = std::fs::read(dir.join("A.kld")).unwrap();
    assert_eq!(ours_bytes.len(), theirs_bytes.len(), "file sizes");
    let head = 20 + 4 * n_chunk * n_ctx;
    assert_eq!(ours_bytes[..head], theirs_bytes[..head], "header and tokens");

    let ours = BaseFile::open(&out).unwrap();
    let (mut differ, mut worst, mut worst_scale, mut worst_min) = (0usize, 0i32, 0f64, 0f64);
    for i in 0..ours.records() {
        let (o, t) = (ours.record(i), theirs.record(i));
        let (os, ts) = (f64::from(o.scale), f64::from(t.scale));
        let (om, tm) = (f64::from(o.min_log_prob), f64::from(t.min_log_prob));
        assert!(close(os, ts, 0.0, 1e-5), "record {i}: scale ours {os} llama.cpp {ts}");
        assert!(close(om, tm, 2e-5, 0.0), "record {i}: min_log_prob ours {om} llama.cpp {tm}");
        worst_scale = worst_scale.max((os - ts).abs() / ts);
        worst_min = worst_min.max((om - tm).abs());
        for (j, (&oq, &tq)) in o.q.iter().zip(t.q).enumerate() {
            let diff = i32::from(oq) - i32::from(tq);
            assert!(diff.abs() <= 1, "record {i}, entry {j}: q ours {oq} llama.cpp {tq}");
            differ += usize::from(diff != 0);
            worst = worst.max(diff.abs());
        }
        // The padding word is zero in both.
        let pad = 20 + 4 * n_chunk * n_ctx + i * (8 + 2 * 4094) + 8 + 2 * 4093;
        assert_eq!(ours_bytes[pad..pad + 2], [0, 0], "record {i}: padding");
        assert_eq!(theirs_bytes[pad..pad + 2], [0, 0], "record {i}: llama.cpp's padding");
    }
    let total = ours.records() * v;
    eprintln!(
        "q values differing from llama.cpp's: {differ} of {total} ({:.3}%), max |diff| {worst}; \
         scale max rel diff {worst_scale:.2e}, min_log_prob max abs diff {worst_min:.2e}",
        100.0 * differ as f64 / total as f64
    );
    // The inputs differ from llama.cpp's f32 logits by < 1e-5, i.e. < 0.041 of a level (and most
    // by far less): only those within that distance of a rounding boundary may round the other
    // way (0.3% measured).
    assert!(differ * 50 < total, "{differ} of {total} q values differ from llama.cpp's");
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// Scoring against llama.cpp's file: its printed numbers.

#[test]
fn scores_like_llama_cpp() {
    let dir = fixture_dir();
    let base = BaseFile::open(&dir.join("A.kld")).unwrap();
    let (b, shape) = f32_npy(&dir.join("B_logits.npy"));
    assert_eq!(shape, [124, 4093]);
    let v = base.n_vocab();
    let rows: Vec<KldRow> = (0..base.records())
        .map(|i| llamacpp::llama_row(&b[i * v..(i + 1) * v], &base.record(i), base.target(i)).unwrap())
        .collect();
    let n = rows.len() as f64;
    let mean = |f: &dyn Fn(&KldRow) -> f64| rows.iter().map(f).sum::<f64>() / n;
    let kld_mean = mean(&|r| f64::from(r.kld));
    let same_top = rows.iter().filter(|r| r.same_top()).count() as f64 / n;
    let ppl_test = mean(&|r| f64::from(r.nll_test)).exp();
    let ppl_base = mean(&|r| f64::from(r.nll_base)).exp();
    let dp_mean = mean(&|r| f64::from(r.dp));
    let kld_max = rows.iter().map(|r| r.kld).fold(f32::NEG_INFINITY, f32::max);
    let kld_min = rows.iter().map(|r| r.kld).fold(f32::INFINITY, f32::min);
    assert!(rows.iter().all(|r| r.has_target() && r.is_written()));
    eprintln!(
        "fixture: mean KLD {kld_mean:.9}, same top {same_top:.6}, PPL(Q) {ppl_test:.9}, PPL(base) {ppl_base:.9}, \
         mean dp {dp_mean:.9}, max KLD {kld_max:.9}, min KLD {kld_min:.9}"
    );
    // Each value must print as llama.cpp's, except for what the inputs allow: the fixture's test
    // logits come from a float64 forward pass and differ from llama.cpp's f32 ones by < 1e-5, which
    // moves a token's nll by < 2e-5 (PPL(Q) by < 2e-5 relative), its KLD by < 2e-5 (the change of
    // Σ p_i (log p_i − log q_i) is Σ (q_i − p_i)·δb_i minus the same shift) and its Δp by < 2e-5.
    // PPL(base) and the same-top count depend on the base file only (and on the test argmax,
    // which no such noise flips here): no allowance.
    let checks = [
        ("Mean PPL(Q)", ppl_test, "172.760694", 2e-5 * ppl_test),
        ("Mean PPL(base)", ppl_base, "154.265084", 0.0),
        ("Mean KLD", kld_mean, "0.015890", 2e-5),
        ("Maximum KLD", f64::from(kld_max), "0.215698", 2e-5),
        ("Minimum KLD", f64::from(kld_min), "0.000016", 2e-5),
        ("Mean Δp %", 100.0 * dp_mean, "-0.030", 100.0 * 2e-5),
        ("Same top p %", 100.0 * same_top, "94.355", 0.0),
    ];
    let mut exact = 0;
    for (what, ours, printed, allowance) in checks {
        let decimals = printed.split('.').nth(1).map_or(0, str::len);
        let shown = format!("{ours:.decimals$}");
        let want: f64 = printed.parse().unwrap();
        let half_unit = 0.5 * 10f64.powi(-(decimals as i32));
        eprintln!("{what:>15}: ours {shown:>12} ({ours:.9}), llama.cpp {printed:>12}");
        assert!(
            (ours - want).abs() <= half_unit * (1.0 + 1e-9) + allowance,
            "{what}: ours {ours} prints {shown}, llama.cpp printed {printed} (allowance {allowance:e})"
        );
        exact += usize::from(shown == printed);
    }
    eprintln!("{exact} of 7 print exactly as llama.cpp's");
    assert!(exact >= 5, "only {exact} of 7 values print exactly as llama.cpp's");
}

// ---------------------------------------------------------------------------------------------
// The per-token computation against a plain f64 one on the same dequantised values.

/// A small deterministic generator (xorshift), uniform in [-1, 1).
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

#[test]
fn llama_row_matches_plain_f64() {
    for (seed, v, spread, diff) in [(1, 2, 1.0, 0.01), (2, 7, 5.0, 0.1), (3, 1000, 8.0, 0.05), (4, 4093, 12.0, 1.0)] {
        let a: Vec<f32> = noise(seed, v).iter().map(|x| x * spread).collect();
        let b: Vec<f32> = a.iter().zip(noise(seed + 100, v)).map(|(x, e)| x + diff * e).collect();
        let mut q = vec![0u16; v];
        let (scale, min_log_prob) = llamacpp::quantise(&a, &mut q).unwrap();
        let rec = Record { scale, min_log_prob, q: &q };
        // The stored log-probabilities are within half a level of the true ones above the floor.
        let lse_a = {
            let m = a.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            m + a.iter().map(|&x| (f64::from(x) - m).exp()).sum::<f64>().ln()
        };
        for (j, &x) in a.iter().enumerate() {
            let truth = f64::from(x) - lse_a;
            let stored = f64::from(rec.log_prob(j));
            if stored > f64::from(min_log_prob) {
                assert!(
                    close(stored, truth, 0.51 * f64::from(scale) + 1e-5, 0.0),
                    "v {v} entry {j}: {stored} vs {truth}"
                );
            }
        }
        let m = b.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
        let lse_b = m + b.iter().map(|&x| (f64::from(x) - m).exp()).sum::<f64>().ln();
        let mut kld = 0f64;
        for (j, &x) in b.iter().enumerate() {
            let lp = f64::from(rec.log_prob(j));
            if lp > -16.0 {
                kld += lp.exp() * (lp - (f64::from(x) - lse_b));
            }
        }
        for t in [0u32, (v / 2) as u32, NO_TARGET] {
            let row = llamacpp::llama_row(&b, &rec, t).unwrap();
            assert!(close(f64::from(row.kld), kld, 1e-6, 1e-4), "v {v}: kld {} vs f64 {kld}", row.kld);
            let argmax = |x: &[f64]| (0..x.len()).fold(0, |best, i| if x[i] > x[best] { i } else { best });
            let lb: Vec<f64> = (0..v).map(|j| f64::from(rec.log_prob(j))).collect();
            let bb: Vec<f64> = b.iter().map(|&x| f64::from(x)).collect();
            assert_eq!(row.argmax_base as usize, argmax(&lb), "v {v}");
            assert_eq!(row.argmax_test as usize, argmax(&bb), "v {v}");
            assert_eq!(row.same_top(), argmax(&lb) == argmax(&bb));
            if t == NO_TARGET {
                assert!(!row.has_target());
                assert_eq!((row.nll_test, row.nll_base, row.dp), (0.0, 0.0, 0.0));
            } else {
                let nll_test = lse_b - f64::from(b[t as usize]);
                let nll_base = -lb[t as usize];
                assert!(row.has_target());
                assert!(
                    close(f64::from(row.nll_test), nll_test, 1e-5, 1e-6),
                    "v {v}: nll_test {} vs {nll_test}",
                    row.nll_test
                );
                assert!(
                    close(f64::from(row.nll_base), nll_base, 1e-6, 1e-6),
                    "v {v}: nll_base {} vs {nll_base}",
                    row.nll_base
                );
                let dp = (-nll_test).exp() - (-nll_base).exp();
                assert!(close(f64::from(row.dp), dp, 1e-6, 1e-5), "v {v}: dp {} vs {dp}", row.dp);
            }
        }
    }
}

#[test]
fn llama_row_edge_cases() {
    let q = [0u16, 65535, 100];
    let rec = Record { scale: 16.0 / 65535.0, min_log_prob: -16.5, q: &q };
    // Broken test rows: NaN, +inf, only -inf.
    for bad in [[0.0, f32::NAN, 1.0], [0.0, f32::INFINITY, 1.0], [f32::NEG_INFINITY; 3]] {
        let row = llamacpp::llama_row(&bad, &rec, 1).unwrap();
        assert!(row.kld.is_nan(), "{bad:?}: kld {}", row.kld);
        assert_eq!((row.argmax_base, row.argmax_test), (u32::MAX, u32::MAX), "{bad:?}");
        assert!(!row.same_top());
    }
    // A -inf test logit where the base has mass: infinite KLD and nll.
    let row = llamacpp::llama_row(&[0.0, f32::NEG_INFINITY, 1.0], &rec, 1).unwrap();
    assert_eq!((row.kld, row.nll_test), (f32::INFINITY, f32::INFINITY));
    // Mismatched lengths and targets out of range are errors, not panics.
    assert!(llamacpp::llama_row(&[0.0, 1.0], &rec, 0).is_err());
    assert!(llamacpp::llama_row(&[0.0, 1.0, 2.0], &rec, 3).is_err());
    assert!(llamacpp::dequantise(&rec, &mut [0.0; 2]).is_err());
    // Ties: first index on both sides.
    let tie = [0u16, 7, 7];
    let row = llamacpp::llama_row(&[1.0, 3.0, 3.0], &Record { q: &tie, ..rec }, NO_TARGET).unwrap();
    assert_eq!((row.argmax_base, row.argmax_test), (1, 1));
    assert!(row.same_top());
    // A constant row quantises to scale 0, all levels 0, log p = -log V.
    let mut q = [1u16; 4];
    let (scale, min_log_prob) = llamacpp::quantise(&[2.5; 4], &mut q).unwrap();
    assert_eq!((scale, q), (0.0, [0; 4]));
    assert!(close(f64::from(min_log_prob), -(4f64.ln()), 1e-6, 0.0), "{min_log_prob}");
    // Rows llama.cpp would store as garbage are refused.
    assert!(llamacpp::quantise(&[0.0, f32::NAN], &mut [0; 2]).is_none());
    assert!(llamacpp::quantise(&[f32::NEG_INFINITY; 2], &mut [0; 2]).is_none());
    // -inf entries sit at level 0.
    let mut q = [9u16; 3];
    llamacpp::quantise(&[f32::NEG_INFINITY, 0.0, -3.0], &mut q).unwrap();
    assert_eq!(q[..2], [0, 65535]);
}

// ---------------------------------------------------------------------------------------------
// Writing: round trips through every dtype, streaming, and refusals that leave nothing behind.

#[test]
fn write_round_trip_dtypes_and_blocks() {
    let d = tmp("dtypes");
    let (n_chunk, n_ctx, v) = (3usize, 9usize, 37usize);
    let logits: Vec<f32> = noise(7, n_chunk * n_ctx * v).iter().map(|x| 6.0 * x).collect();
    let tokens: Vec<i32> = (0..n_chunk * n_ctx).map(|i| ((i * 7) % v) as i32).collect();
    let tokens_path = d.join("tokens.npy");
    xent::io::write_npy(&tokens_path, "<i4", &[n_chunk, n_ctx], bytemuck::cast_slice(&tokens)).unwrap();
    let tok = xent::io::open(&tokens_path, None, &[]).unwrap();
    for dtype in [xent::Dtype::F32, xent::Dtype::F16, xent::Dtype::BF16] {
        let bytes = dtype.encode(&logits);
        let name = match dtype {
            xent::Dtype::F32 => "F32",
            xent::Dtype::F16 => "F16",
            xent::Dtype::BF16 => "BF16",
        };
        let path = d.join(format!("logits-{name}.safetensors"));
        let mut file = xent::io::safetensors_header("logits", name, &[n_chunk, n_ctx, v], bytes.len());
        file.extend_from_slice(&bytes);
        std::fs::write(&path, file).unwrap();
        let t = xent::io::open(&path, None, &[]).unwrap();
        let out = d.join(format!("{name}.kld"));
        llamacpp::write_base_file(&t, &tok, &out).unwrap();
        let base = BaseFile::open(&out).unwrap();
        assert_eq!((base.n_ctx(), base.n_vocab(), base.n_chunk(), base.records()), (n_ctx, v, n_chunk, 3 * 4));
        assert_eq!(base.tokens(), &tokens[..]);
        // Each record is the quantisation of the decoded row at position n_ctx/2 + j.
        let decoded = t.logits().unwrap();
        let mut q = vec![0u16; v];
        for i in 0..base.records() {
            let (c, j) = (i / 4, i % 4);
            let r = c * n_ctx + n_ctx / 2 + j;
            let row: Vec<f32> = (0..v).map(|k| decoded.get(r, k)).collect();
            let (scale, min_log_prob) = llamacpp::quantise(&row, &mut q).unwrap();
            let rec = base.record(i);
            assert_eq!((rec.scale, rec.min_log_prob, rec.q), (scale, min_log_prob, &q[..]), "{name} record {i}");
            assert_eq!(base.target(i), tokens[r + 1] as u32);
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn writer_streams_and_refuses() {
    let d = tmp("writer");
    let path = d.join("w.kld");
    let tokens = [0, 1, 2, 1, 2, 0, 1, 0];
    // n_ctx 4: one record per chunk.
    let mut w = BaseWriter::create(&path, 4, 3, &tokens).unwrap();
    w.push(&[0.5, 1.0, -2.0]).unwrap();
    assert_eq!((w.pushed(), w.remaining()), (1, 1));
    assert!(!path.exists(), "nothing at the path before finish");
    // A bad row names the record and writes nothing.
    let e = err_of(w.push(&[f32::NAN, 0.0, 0.0]));
    assert!(e.contains("record 1 (chunk 1, position 2)"), "{e}");
    assert!(w.push(&[0.0; 6]).is_err(), "more rows than records left");
    assert!(w.push(&[0.0; 2]).is_err(), "not a whole row");
    w.push(&[0.0, 0.0, 3.0]).unwrap();
    w.finish().unwrap();
    let base = BaseFile::open(&path).unwrap();
    assert_eq!((base.records(), base.target(0), base.target(1)), (2, 1, 0));

    // Finishing early removes everything.
    let early = d.join("early.kld");
    let mut w = BaseWriter::create(&early, 4, 3, &tokens).unwrap();
    w.push(&[0.5, 1.0, -2.0]).unwrap();
    let e = err_of(w.finish());
    assert!(e.contains("only 1 of 2 records"), "{e}");
    assert!(!early.exists());
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "no temporary file left behind");

    // Bad arguments.
    for (n_ctx, v, toks) in
        [(1, 3, &tokens[..]), (4, 0, &tokens[..]), (3, 3, &tokens[..]), (4, 3, &[][..]), (4, 2, &tokens[..])]
    {
        assert!(BaseWriter::create(&d.join("x.kld"), n_ctx, v, toks).is_err(), "n_ctx {n_ctx} v {v}");
    }
    assert!(!d.join("x.kld").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn write_base_file_refuses_bad_inputs() {
    let d = tmp("refuse");
    let npy = |name: &str, descr: &str, shape: &[usize], bytes: &[u8]| {
        let p = d.join(name);
        xent::io::write_npy(&p, descr, shape, bytes).unwrap();
        xent::io::open(&p, None, &[]).unwrap()
    };
    let good = vec![0.5f32; 2 * 4 * 3];
    let out = d.join("out.kld");
    let cases: Vec<(xent::io::Tensor, xent::io::Tensor, &str, &str)> = vec![
        // Tokens of the wrong shape.
        (
            npy("l1.npy", "<f4", &[2, 4, 3], bytemuck::cast_slice(&good)),
            npy("t1.npy", "<i8", &[2, 3], bytemuck::cast_slice(&[0i64; 6])),
            "t1.npy",
            "[n_chunk, n_ctx]",
        ),
        // Logits of rank 2.
        (
            npy("l2.npy", "<f4", &[8, 3], bytemuck::cast_slice(&good)),
            npy("t2.npy", "<i8", &[2, 4], bytemuck::cast_slice(&[0i64; 8])),
            "l2.npy",
            "[n_chunk, n_ctx, V]",
        ),
        // A token out of the vocabulary, and one beyond int32.
        (
            npy("l3.npy", "<f4", &[2, 4, 3], bytemuck::cast_slice(&good)),
            npy("t3.npy", "<i8", &[2, 4], bytemuck::cast_slice(&[0i64, 1, 2, 3, 0, 0, 0, 0])),
            "t3.npy",
            "token 3 (chunk 0, position 3) is 3",
        ),
        (
            npy("l4.npy", "<f4", &[2, 4, 3], bytemuck::cast_slice(&good)),
            npy("t4.npy", "<i8", &[2, 4], bytemuck::cast_slice(&[0i64, 0, 0, 0, 0, 1 << 40, 0, 0])),
            "t4.npy",
            "outside the vocabulary",
        ),
        (
            npy("l5.npy", "<f4", &[2, 4, 3], bytemuck::cast_slice(&good)),
            npy("t5.npy", "<i8", &[2, 4], bytemuck::cast_slice(&[0i64, 0, 0, 0, 0, -1, 0, 0])),
            "t5.npy",
            "is -1",
        ),
        // n_ctx 1.
        (
            npy("l6.npy", "<f4", &[8, 1, 3], bytemuck::cast_slice(&good)),
            npy("t6.npy", "<i8", &[8, 1], bytemuck::cast_slice(&[0i64; 8])),
            "l6.npy",
            "n_ctx >= 2",
        ),
        // Integer logits.
        (
            npy("l7.npy", "<i4", &[2, 4, 3], bytemuck::cast_slice(&[0i32; 24])),
            npy("t7.npy", "<i8", &[2, 4], bytemuck::cast_slice(&[0i64; 8])),
            "l7.npy",
            "f32, f16 or bf16",
        ),
    ];
    for (l, t, name, what) in &cases {
        let e = err_of(llamacpp::write_base_file(l, t, &out));
        assert!(e.contains(name) && e.contains(what), "expected '{name}' and '{what}' in: {e}");
        assert!(!out.exists(), "{e}: nothing written");
    }
    // A NaN in a stored position (chunk 1, position 2) is refused; one in an unstored position is not read.
    let mut nan = good.clone();
    nan[(4 + 2) * 3 + 1] = f32::NAN;
    let l = npy("nan.npy", "<f4", &[2, 4, 3], bytemuck::cast_slice(&nan));
    let t = npy("tok.npy", "<i8", &[2, 4], bytemuck::cast_slice(&[0i64; 8]));
    let e = err_of(llamacpp::write_base_file(&l, &t, &out));
    assert!(e.contains("nan.npy") && e.contains("chunk 1, position 2"), "{e}");
    assert!(!out.exists());
    let mut unstored = good.clone();
    unstored[3] = f32::NAN;
    let l = npy("unstored.npy", "<f4", &[2, 4, 3], bytemuck::cast_slice(&unstored));
    llamacpp::write_base_file(&l, &t, &out).unwrap();
    let _ = std::fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// Bad files.

/// A small valid base file: n_ctx 5 (2 records per chunk), n_vocab 3 (one pad word), 2 chunks.
fn small_file(dir: &Path) -> Vec<u8> {
    let p = dir.join("small.kld");
    let tokens = [0, 1, 2, 1, 0, 2, 2, 1, 0, 1];
    let mut w = BaseWriter::create(&p, 5, 3, &tokens).unwrap();
    w.push(&[0.5, 1.0, -2.0, 0.0, 0.0, 3.0, 1.0, 2.0, 3.0, -1.0, -1.0, 0.0]).unwrap();
    w.finish().unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes.len(), 20 + 4 * 10 + 4 * (8 + 2 * 4));
    BaseFile::open(&p).unwrap();
    bytes
}

#[test]
fn rejects_bad_files_without_allocating() {
    let d = tmp("bad");
    let good = small_file(&d);
    let with_int = |at: usize, v: i32| {
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("magic.kld", [b"_logitz_".as_slice(), &good[8..]].concat(), "magic"),
        ("empty.kld", Vec::new(), "magic"),
        ("header.kld", good[..14].to_vec(), "truncated header"),
        ("tokens.kld", good[..20 + 4 * 7].to_vec(), "token table"),
        ("record.kld", good[..good.len() - 2].to_vec(), "3 whole records of 4 and 14 bytes"),
        ("records.kld", good[..20 + 40 + 16].to_vec(), "1 whole records of 4 and 0 bytes"),
        ("extra.kld", [good.as_slice(), &[0, 0, 0, 0]].concat(), "4 bytes past the last record"),
        ("vocab.kld", with_int(12, i32::MAX), "n_vocab=2147483647"),
        ("ctx.kld", with_int(8, i32::MAX), "n_ctx=2147483647"),
        ("chunk.kld", with_int(16, i32::MAX), "n_chunk=2147483647"),
        ("ctx1.kld", with_int(8, 1), "n_ctx >= 2"),
        ("negative.kld", with_int(12, -3), "n_vocab >= 1"),
        ("zero.kld", with_int(16, 0), "n_chunk >= 1"),
        ("token.kld", with_int(20 + 4 * 6, 3), "token 6 (chunk 1, position 1) is 3"),
        ("token-neg.kld", with_int(20, -1), "token 0 (chunk 0, position 0) is -1"),
    ];
    for (name, bytes, what) in cases {
        let p = d.join(name);
        std::fs::write(&p, &bytes).unwrap();
        let (r, largest) = largest_allocation(|| BaseFile::open(&p));
        let e = err_of(r);
        assert!(e.contains(name), "{name}: the message names the file: {e}");
        assert!(e.contains(what), "{name}: expected '{what}' in: {e}");
        assert!(largest < 64 << 10, "{name}: allocated {largest} bytes");
    }
    // A directory and a missing file.
    assert!(err_of(BaseFile::open(&d)).contains("directory"));
    assert!(err_of(BaseFile::open(&d.join("missing.kld"))).contains("missing.kld"));
    // The magic check used to tell base files from logits.
    assert!(llamacpp::is_base_file(&d.join("small.kld")));
    assert!(!llamacpp::is_base_file(&d.join("magic.kld")));
    let _ = std::fs::remove_dir_all(&d);
}
