//! `xent kld` and `xent kld-base` against llama.cpp's own output (tests/fixtures/llamacpp, see its
//! README), the f64 reference, merging, and the bad inputs they must refuse cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llamacpp");

fn fixture(name: &str) -> String {
    format!("{FIXTURE}/{name}")
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xent-kld-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xent")).env("XDG_RUNTIME_DIR", std::env::temp_dir()).args(args).output().unwrap()
}

fn json(args: &[&str]) -> Value {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn fails(args: &[&str], needle: &str) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(err.contains(needle), "{args:?}: stderr lacks {needle:?}: {err}");
    assert_eq!(err.trim().lines().filter(|l| l.starts_with("xent: error")).count(), 1, "{err}");
}

/// `got` equals llama.cpp's printed `want` to its printed precision: within `ulps` units of the
/// last printed digit (`unit`).
fn printed(v: &Value, key: &str, want: f64, unit: f64, ulps: f64) {
    let got = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing or null in {v}"));
    assert!((got - want).abs() <= unit * (0.5 + ulps), "{key}: got {got}, llama.cpp printed {want}");
}

/// llama.cpp's `--kl-divergence` block for model B against A.kld (kld_B_vs_A.txt), reproduced.
/// Values that depend only on the base file match to the printed digit (±1 for llama.cpp's float
/// rounding); values of the test side may differ by 2 units of the last digit, because the
/// fixture's logits come from a float64 forward pass and llama.cpp's own f32 logits differ from
/// them by up to 1e-5 (the fixture's README).
#[test]
fn reproduces_llamacpp_kld_output_from_its_base_file() {
    let v = json(&["kld", "--base", &fixture("A.kld"), "--logits", &fixture("B_logits.npy"), "--json"]);
    assert_eq!(v["tokens"], 124);
    assert_eq!(v["percentiles"], "exact");
    let (base, test) = (1.0, 2.0);
    printed(&v, "ppl_test", 172.760694, 1e-6, 60.0); // PPL itself amplifies the 1e-5 logit noise
    printed(&v, "ppl_test_stderr", 92.117255, 1e-6, 40.0);
    printed(&v, "ppl_base", 154.265084, 1e-6, base);
    printed(&v, "ppl_base_stderr", 79.116833, 1e-6, base);
    printed(&v, "ppl_cor", 0.9961, 1e-4, test);
    printed(&v, "ln_ppl_ratio", 0.113235, 1e-6, test);
    printed(&v, "ln_ppl_ratio_stderr", 0.050594, 1e-6, test);
    printed(&v, "ppl_ratio", 1.119895, 1e-6, test);
    printed(&v, "ppl_ratio_stderr", 0.056660, 1e-6, test);
    printed(&v, "ppl_diff", 18.495610, 1e-6, 60.0);
    printed(&v, "ppl_diff_stderr", 15.039934, 1e-6, 40.0);
    for (key, want) in [
        ("kld_mean", 0.015890),
        ("kld_stderr", 0.002487),
        ("kld_max", 0.215698),
        ("kld_p99_9", 0.205949),
        ("kld_p99", 0.132682),
        ("kld_p95", 0.058083),
        ("kld_p90", 0.037185),
        ("kld_median", 0.006683),
        ("kld_p10", 0.000459),
        ("kld_p5", 0.000188),
        ("kld_p1", 0.000031),
        ("kld_p0_1", 0.000017),
        ("kld_min", 0.000016),
    ] {
        printed(&v, key, want, 1e-6, test);
    }
    // Δp and same top are printed in percent.
    for (key, want) in [
        ("dp_mean", -0.030),
        ("dp_stderr", 0.334),
        ("dp_max", 13.600),
        ("dp_p99_9", 13.228),
        ("dp_p99", 10.149),
        ("dp_p95", 6.588),
        ("dp_p90", 4.053),
        ("dp_p75", 0.288),
        ("dp_median", -0.000),
        ("dp_p25", -0.314),
        ("dp_p10", -4.031),
        ("dp_p5", -6.117),
        ("dp_p1", -8.284),
        ("dp_p0_1", -17.455),
        ("dp_min", -18.730),
        ("dp_rms", 3.702),
        ("dp_rms_stderr", 0.479),
        ("same_top", 94.355),
        ("same_top_stderr", 2.081),
    ] {
        let got = v[key].as_f64().unwrap() * 100.0;
        assert!((got - want).abs() <= 1e-3 * (0.5 + test), "{key}: got {got} %, llama.cpp printed {want} %");
    }
    // The human block has llama.cpp's lines.
    let o = run(&["kld", "--base", &fixture("A.kld"), "--logits", &fixture("B_logits.npy")]);
    let text = String::from_utf8_lossy(&o.stdout);
    for line in [
        "====== Perplexity statistics ======",
        "Mean PPL(base)                : 154.265084",
        "Mean    KLD:   0.015890 ±   0.002487",
        "Same top p: 94.355 ± 2.081 %",
        "RMS Δp    :  3.702 ± 0.479 %",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

/// llama.cpp's plain perplexity of model A: `Final estimate: PPL = 171.4041 +/- 91.34282`.
#[test]
fn score_reproduces_llamacpp_perplexity() {
    let v = json(&["score", "--logits", &fixture("A_logits.npy"), "--targets", &fixture("targets.npy"), "--json"]);
    printed(&v, "perplexity", 171.4041, 1e-4, 1.0);
    printed(&v, "ppl_stderr", 91.34282, 1e-5, 1.0);
}

fn npy_f32(path: &Path, shape: &[usize], x: &[f32]) -> String {
    xent::io::write_npy(path, "<f4", shape, bytemuck::cast_slice(x)).unwrap();
    path.to_str().unwrap().to_string()
}

/// A's logits as llama.cpp's [n_chunk, n_ctx, V] layout: rows at positions 32..62 of each chunk.
fn a_as_chunks(d: &Path) -> String {
    let a = xent::io::open(Path::new(&fixture("A_logits.npy")), None, &[]).unwrap();
    let a: &[f32] = bytemuck::cast_slice(a.bytes());
    let v = 4093;
    let mut x = vec![0f32; 4 * 64 * v];
    for k in 0..4 {
        for j in 0..31 {
            let (dst, src) = ((k * 64 + 32 + j) * v, (k * 31 + j) * v);
            x[dst..dst + v].copy_from_slice(&a[src..src + v]);
        }
    }
    npy_f32(&d.join("a_chunks.npy"), &[4, 64, v], &x)
}

/// kld-base on A's logits writes llama.cpp's header and tokens byte for byte, and records that
/// read back to the statistics of A.kld and of the logits themselves (within 16-bit quantisation).
#[test]
fn kld_base_round_trips_against_llamacpp_and_the_logits() {
    let d = dir("roundtrip");
    let chunks = a_as_chunks(&d);
    let out = d.join("ours.kld");
    let o = run(&["kld-base", "--logits", &chunks, "--tokens", &fixture("tokens.npy"), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ours, theirs) = (std::fs::read(&out).unwrap(), std::fs::read(fixture("A.kld")).unwrap());
    assert_eq!(ours.len(), theirs.len());
    let head = 20 + 4 * 4 * 64;
    assert_eq!(ours[..head], theirs[..head], "header and tokens");

    let ours_v = json(&["kld", "--base", out.to_str().unwrap(), "--logits", &fixture("B_logits.npy"), "--json"]);
    let theirs_v = json(&["kld", "--base", &fixture("A.kld"), "--logits", &fixture("B_logits.npy"), "--json"]);
    let logits_v = json(&[
        "kld",
        "--base",
        &fixture("A_logits.npy"),
        "--logits",
        &fixture("B_logits.npy"),
        "--targets",
        &fixture("targets.npy"),
        "--json",
    ]);
    for key in ["kld_mean", "kld_median", "kld_max", "ppl_base", "ppl_test", "dp_mean", "dp_rms", "same_top"] {
        let (a, b) = (ours_v[key].as_f64().unwrap(), theirs_v[key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6 + 1e-4 * b.abs(), "{key}: ours {a} vs llama.cpp's file {b}");
    }
    // Against the unquantised logits: the 16-bit records change KLD by well under 1%; the base
    // perplexity differs by design (llama.cpp floors log-probabilities at max - 16).
    for key in ["kld_mean", "kld_median", "ppl_test", "same_top", "dp_rms"] {
        let (a, b) = (ours_v[key].as_f64().unwrap(), logits_v[key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-5 + 5e-3 * b.abs(), "{key}: from the base file {a} vs from the logits {b}");
    }
    // A llama.cpp base file as the test side, and the [n_chunk, n_ctx, V] layout: the same positions
    // (a KLD left only by the 16-bit levels and the -16 cut-off; misplaced rows would give ~1e-2).
    let same = json(&["kld", "--base", &fixture("A.kld"), "--logits", &chunks, "--json"]);
    assert!(same["kld_mean"].as_f64().unwrap() < 1e-5, "A against its own base file: {}", same["kld_mean"]);
    assert_eq!(same["same_top"], 1.0);
    // A base file against our own of the same model: the test side's floored entries (every
    // log-probability below max - 16 stored at the floor) add ~4e-4 of mass, so KLD ~3e-5.
    let self_v = json(&["kld", "--base", &fixture("A.kld"), "--logits", out.to_str().unwrap(), "--json"]);
    assert!(self_v["kld_mean"].as_f64().unwrap() < 1e-4, "{}", self_v["kld_mean"]);
    assert_eq!(self_v["same_top"], 1.0);
}

/// The CLI against the library's f64 reference, merged shard summaries against one run, and the
/// per-token output.
#[test]
fn kld_files_shards_merge_and_per_token() {
    let d = dir("shards");
    let (rows, vocab) = (96, 300);
    let (a, b, t) = xent::synth::kld_pair(rows, vocab, 5, 0.05);
    let args = vec!["kld".to_string()];
    let mut paths = (Vec::new(), Vec::new(), Vec::new());
    for s in 0..3 {
        let r = s * 32..(s + 1) * 32;
        paths.0.push(npy_f32(&d.join(format!("a{s}.npy")), &[32, vocab], &a[r.start * vocab..r.end * vocab]));
        let bb = xent::Dtype::BF16.encode(&b[r.start * vocab..r.end * vocab]);
        let bp = d.join(format!("b{s}.safetensors"));
        let header = xent::io::safetensors_header("logits", "BF16", &[32, vocab], bb.len());
        std::fs::write(&bp, [header, bb].concat()).unwrap();
        paths.1.push(bp.to_str().unwrap().to_string());
        let tp = d.join(format!("t{s}.npy"));
        xent::io::write_npy(&tp, "<i8", &[32], bytemuck::cast_slice(&t[r])).unwrap();
        paths.2.push(tp.to_str().unwrap().to_string());
    }
    let all = |extra: &[&str]| {
        let mut v: Vec<String> = args.clone();
        v.push("--base".into());
        v.extend(paths.0.iter().cloned());
        v.push("--logits".into());
        v.extend(paths.1.iter().cloned());
        v.push("--targets".into());
        v.extend(paths.2.iter().cloned());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let pt = d.join("pt.npy");
    let one: Vec<String> = all(&["--json", "--device", "cpu", "--per-token", pt.to_str().unwrap()]);
    let v = json(&one.iter().map(String::as_str).collect::<Vec<_>>());
    // The reference on the same inputs (the test side rounded to bf16, as in the files).
    let bq: Vec<f32> = b.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    let base = xent::Logits::f32(&a, vocab).unwrap();
    let test = xent::Logits::f32(&bq, vocab).unwrap();
    let want = xent::kld::reference::kld(base, test, Some(xent::Targets::I64(&t)), &Default::default()).unwrap();
    let scored: Vec<_> = want.iter().filter(|r| !r.ignored).collect();
    let mean = scored.iter().map(|r| r.kld).sum::<f64>() / scored.len() as f64;
    assert_eq!(v["tokens"].as_u64().unwrap() as usize, scored.len());
    let got = v["kld_mean"].as_f64().unwrap();
    assert!((got - mean).abs() <= 1e-7 + 1e-4 * mean, "kld_mean {got} vs reference {mean}");
    let per_token = xent::io::open(&pt, None, &[]).unwrap();
    let per_token: &[f32] = bytemuck::cast_slice(per_token.bytes());
    for (i, (g, w)) in per_token.iter().zip(&want).enumerate() {
        assert!((f64::from(*g) - w.kld).abs() <= 1e-7 + 1e-4 * w.kld, "row {i}: {g} vs {}", w.kld);
    }
    // The GPU path over the same files (lavapipe counts; a loud skip without any adapter).
    if common::gpu().is_some() {
        let pt_gpu = d.join("pt-gpu.npy");
        let on_gpu: Vec<String> = all(&["--json", "--device", "gpu", "--per-token", pt_gpu.to_str().unwrap()]);
        let g = json(&on_gpu.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(g["device"], "gpu");
        assert_eq!(g["tokens"], v["tokens"]);
        assert_eq!(g["same_top"], v["same_top"]);
        let got = g["kld_mean"].as_f64().unwrap();
        assert!((got - mean).abs() <= 1e-7 + 1e-4 * mean, "gpu kld_mean {got} vs reference {mean}");
        let per_token = xent::io::open(&pt_gpu, None, &[]).unwrap();
        let per_token: &[f32] = bytemuck::cast_slice(per_token.bytes());
        for (i, (g, w)) in per_token.iter().zip(&want).enumerate() {
            assert!((f64::from(*g) - w.kld).abs() <= 1e-7 + 1e-4 * w.kld, "gpu row {i}: {g} vs {}", w.kld);
        }
    }
    // Per-token .safetensors: kld and same_top always, nll_base / nll_test / dp only with targets.
    let st = d.join("pt.safetensors");
    let with: Vec<String> = all(&["--device", "cpu", "--quiet", "--per-token", st.to_str().unwrap()]);
    assert!(run(&with.iter().map(String::as_str).collect::<Vec<_>>()).status.success());
    let names = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut n: Vec<String> = st.names().into_iter().map(String::from).collect();
        n.sort();
        (n, st.tensor("kld").unwrap().shape().to_vec())
    };
    assert_eq!(
        names(&st),
        (vec!["dp".into(), "kld".into(), "nll_base".into(), "nll_test".into(), "same_top".into()], vec![96])
    );
    let st2 = d.join("pt2.safetensors");
    let o =
        run(&["kld", "--base", &paths.0[0], "--logits", &paths.1[0], "--quiet", "--per-token", st2.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(names(&st2), (vec!["kld".into(), "same_top".into()], vec![32]));
    // Shards compared apart and merged: the same summary as one run, exact sums to the last digit.
    let mut outs = Vec::new();
    for s in 0..3 {
        let out = d.join(format!("s{s}.json"));
        let o = run(&[
            "kld",
            "--base",
            &paths.0[s],
            "--logits",
            &paths.1[s],
            "--targets",
            &paths.2[s],
            "--device",
            "cpu",
            "--summary-out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        outs.push(out.to_str().unwrap().to_string());
    }
    let mut merge = vec!["merge", "--json"];
    merge.extend(outs.iter().map(String::as_str));
    let m = json(&merge);
    for (key, val) in v.as_object().unwrap() {
        if key == "seconds"
            || key == "device"
            || key.starts_with("kld_p")
            || key.starts_with("dp_p")
            || key.ends_with("median")
            || key == "percentiles"
            || key.contains("sketch")
        {
            continue;
        }
        assert_eq!(&m[key], val, "merged {key}");
    }
    assert_eq!(m["percentiles"], "sketch");
    let (sk, ex) = (m["kld_median"].as_f64().unwrap(), v["kld_median"].as_f64().unwrap());
    assert!((sk - ex).abs() <= 2e-4 * ex, "sketch median {sk} vs exact {ex}");
    // Score and kld summaries do not mix.
    let score_out = d.join("score.json");
    let o = run(&[
        "score",
        "--logits",
        &paths.0[0],
        "--targets",
        &paths.2[0],
        "--summary-out",
        score_out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    fails(&["merge", &outs[0], score_out.to_str().unwrap()], "cannot be merged together");
}

#[test]
fn bad_inputs_are_one_line_errors_and_write_nothing() {
    let d = dir("bad");
    let a = fixture("A_logits.npy");
    let b = fixture("B_logits.npy");
    let small = npy_f32(&d.join("small.npy"), &[124, 10], &vec![0f32; 1240]);
    let rows = npy_f32(&d.join("rows.npy"), &[100, 4093], &vec![0f32; 409_300]);
    let out = d.join("out.npy");
    let o = out.to_str().unwrap();
    fails(&["kld", "--base", &a, "--logits", &small, "--per-token", o], "shape");
    fails(&["kld", "--base", &a, "--logits", &rows, "--per-token", o], "shape");
    fails(&["kld", "--base", &a, &a, "--logits", &b], "one --logits file per --base file");
    fails(
        &["kld", "--base", &fixture("A.kld"), "--logits", &b, "--targets", &fixture("targets.npy")],
        "--targets with a llama.cpp base",
    );
    fails(&["kld", "--base", &fixture("A.kld"), "--logits", &small], "vocab");
    fails(&["kld", "--base", &a, "--logits", &b, "--targets", &fixture("tokens.npy")], "targets");
    fails(&["kld", "--base", &a, "--logits", &b, "--shift"], "--shift needs targets");
    // A truncated llama.cpp base file, and one whose header claims absurd sizes.
    let full = std::fs::read(fixture("A.kld")).unwrap();
    let cut = d.join("cut.kld");
    std::fs::write(&cut, &full[..full.len() - 100]).unwrap();
    fails(&["kld", "--base", cut.to_str().unwrap(), "--logits", &b], "cut.kld");
    let mut absurd = full[..20].to_vec();
    absurd[12..16].copy_from_slice(&i32::MAX.to_le_bytes());
    let absurd_path = d.join("absurd.kld");
    std::fs::write(&absurd_path, &absurd).unwrap();
    fails(&["kld", "--base", absurd_path.to_str().unwrap(), "--logits", &b], "absurd.kld");
    fails(
        &["kld-base", "--logits", &a, "--tokens", &fixture("tokens.npy"), "--out", d.join("x.kld").to_str().unwrap()],
        "",
    );
    assert!(!out.exists() && !d.join("x.kld").exists(), "an output was written");
}
