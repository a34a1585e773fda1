//! The `xent` binary against DESIGN.md's CLI contract, and every bad input it must refuse cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{random_case, to_bytes};
use xent::{Dtype, Logits, Options, Targets};

fn xent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xent"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xent-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    xent().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn npy(path: &Path, descr: &str, shape: &[usize], bytes: &[u8]) -> String {
    xent::io::write_npy(path, descr, shape, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

fn safetensors(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, &[u8])]) -> String {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    path.to_str().unwrap().to_string()
}

/// A tiny JSON field reader for the flat object `--json` prints.
fn field(json: &str, key: &str) -> String {
    let pat = format!("\"{key}\":");
    let at = json.find(&pat).unwrap_or_else(|| panic!("no {key} in {json}")) + pat.len();
    let rest = &json[at..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end].trim_matches('"').to_string()
}

fn gpu_available() -> bool {
    common::gpu().is_some()
}

#[test]
fn score_json_follows_the_contract_on_every_device() {
    let d = dir("json");
    let (rows, vocab) = (40, 301);
    let (x, mut t) = random_case(rows, vocab, 11, 3.0);
    t[3] = -100;
    let lp = npy(&d.join("logits.npy"), "<f4", &[rows, vocab], bytemuck::cast_slice(&x));
    let tp = npy(&d.join("targets.npy"), "<i8", &[rows], bytemuck::cast_slice(&t));
    let reference =
        xent::reference::score(Logits::f32(&x, vocab).unwrap(), Targets::I64(&t), &Options::default()).unwrap();
    let mut want = xent::Summary::default();
    reference.iter().for_each(|r| want.add(r.nll, r.ignored, r.correct));

    let mut devices = vec!["cpu"];
    if gpu_available() {
        devices.push("gpu");
    }
    for device in devices {
        let o = run(&["score", "--logits", &lp, "--targets", &tp, "--device", device, "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let json = String::from_utf8(o.stdout.clone()).unwrap();
        assert_eq!(json.trim().lines().count(), 1, "one JSON object on stdout: {json}");
        assert_eq!(field(&json, "tokens"), "39");
        assert_eq!(field(&json, "ignored"), "1");
        assert_eq!(field(&json, "device"), device);
        let mean: f64 = field(&json, "mean_nll").parse().unwrap();
        assert!((mean - want.mean_nll()).abs() < 1e-5, "{device}: {mean} vs {}", want.mean_nll());
        let ppl: f64 = field(&json, "perplexity").parse().unwrap();
        assert!((ppl / want.perplexity() - 1.0).abs() < 1e-5);
        let bits: f64 = field(&json, "bits_per_token").parse().unwrap();
        assert!((bits - want.bits_per_token()).abs() < 1e-5);
        let se: f64 = field(&json, "ppl_stderr").parse().unwrap();
        assert!((se / want.perplexity_stderr() - 1.0).abs() < 1e-4);
        let acc: f64 = field(&json, "accuracy").parse().unwrap();
        assert!((acc - want.accuracy()).abs() < 1e-12);
        let secs: f64 = field(&json, "seconds").parse().unwrap();
        assert!(secs >= 0.0);
        assert!(stderr(&o).contains("tokens scored"), "human text goes to stderr with --json");
    }
}

#[test]
fn rank3_bf16_safetensors_with_per_token_output() {
    let d = dir("rank3");
    let (b, t_len, vocab) = (3, 7, 1000);
    let (x, mut t) = random_case(b * t_len, vocab, 12, 2.0);
    t[5] = -100;
    let bytes = to_bytes(&x, Dtype::BF16);
    let lp = safetensors(
        &d.join("logits.safetensors"),
        &[("logits", safetensors::Dtype::BF16, vec![b, t_len, vocab], &bytes)],
    );
    let t32: Vec<i32> = t.iter().map(|&v| v as i32).collect();
    let tp = safetensors(
        &d.join("labels.safetensors"),
        &[("labels", safetensors::Dtype::I32, vec![b, t_len], bytemuck::cast_slice(&t32))],
    );
    let out = d.join("nll.npy");
    let device = if gpu_available() { "gpu" } else { "cpu" };
    let o =
        run(&["score", "--logits", &lp, "--targets", &tp, "--device", device, "--per-token", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("20 tokens scored, 1 ignored"));
    let written = xent::io::open(&out, None, &[]).unwrap();
    assert_eq!(written.shape, vec![b * t_len]);
    let nll: Vec<f32> = bytemuck::pod_collect_to_vec(written.bytes());
    let reference = xent::reference::score(
        Logits::from_bytes(&bytes, Dtype::BF16, b * t_len, vocab).unwrap(),
        Targets::I64(&t),
        &Options::default(),
    )
    .unwrap();
    for (i, (g, r)) in nll.iter().zip(&reference).enumerate() {
        assert!(common::close(f64::from(*g), r.nll, common::ATOL, common::RTOL), "row {i}: {g} vs {}", r.nll);
    }
    assert_eq!(nll[5], 0.0, "ignored rows are 0.0");
}

#[test]
fn f16_npy_with_ignore_index_flag() {
    let d = dir("f16");
    let (x, mut t) = random_case(10, 50, 13, 2.0);
    t[2] = 7777;
    let lp = npy(&d.join("l.npy"), "<f2", &[10, 50], &to_bytes(&x, Dtype::F16));
    let t32: Vec<i32> = t.iter().map(|&v| v as i32).collect();
    let tp = npy(&d.join("t.npy"), "<i4", &[10], bytemuck::cast_slice(&t32));
    let o = run(&["score", "--logits", &lp, "--targets", &tp, "--device", "cpu", "--ignore-index", "7777", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(field(&String::from_utf8(o.stdout).unwrap(), "ignored"), "1");
}

/// Runs a score that must fail: non-zero exit, a one-line error containing every `needles`,
/// and no per-token file left behind.
fn assert_fails(logits: &str, targets: &str, extra: &[&str], needles: &[&str]) {
    let out = std::env::temp_dir().join(format!("xent-cli-{}-never.npy", std::process::id()));
    let mut args = vec![
        "score",
        "--logits",
        logits,
        "--targets",
        targets,
        "--device",
        "cpu",
        "--per-token",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure for {logits} / {targets}, got success");
    let line = err.lines().find(|l| l.starts_with("xent: error:")).unwrap_or_else(|| panic!("no error line in {err}"));
    for n in needles {
        assert!(line.contains(n), "error {line:?} should mention {n:?}");
    }
    assert!(!out.exists(), "no output file may be left behind");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let d = dir("bad");
    let (x, t) = random_case(4, 10, 14, 1.0);
    let good_l = npy(&d.join("good_l.npy"), "<f4", &[4, 10], bytemuck::cast_slice(&x));
    let good_t = npy(&d.join("good_t.npy"), "<i8", &[4], bytemuck::cast_slice(&t));
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();

    // Target out of range: names the file, the row, the value and the vocab.
    let bad_t = npy(&d.join("oor.npy"), "<i8", &[4], bytemuck::cast_slice(&[1i64, 2, 10, 3]));
    assert_fails(&good_l, &bad_t, &[], &["oor.npy", "row 2", "target 10", "vocabulary of 10"]);
    // Negative target other than the ignore index.
    let neg = npy(&d.join("neg.npy"), "<i8", &[4], bytemuck::cast_slice(&[1i64, -3, 0, 3]));
    assert_fails(&good_l, &neg, &["--ignore-index", "-100"], &["neg.npy", "row 1", "target -3"]);
    // Row counts differ.
    let short = npy(&d.join("short.npy"), "<i8", &[3], bytemuck::cast_slice(&[1i64, 2, 3]));
    assert_fails(&good_l, &short, &[], &["good_l.npy", "short.npy", "4 rows", "3 targets"]);
    // Integer logits.
    let int_l = npy(&d.join("int_l.npy"), "<i4", &[4, 10], &[0u8; 160]);
    assert_fails(&int_l, &good_t, &[], &["int_l.npy", "logits must be f32, f16 or bf16"]);
    // Float targets.
    let f_t = npy(&d.join("f_t.npy"), "<f4", &[4], &[0u8; 16]);
    assert_fails(&good_l, &f_t, &[], &["f_t.npy", "targets must be i64, i32 or u32"]);
    // Unsupported dtype string.
    let f8 = npy(&d.join("f8.npy"), "<f8", &[4, 10], &[0u8; 320]);
    assert_fails(&f8, &good_t, &[], &["f8.npy", "'<f8' is not supported"]);
    // Logits of rank 1.
    let r1 = npy(&d.join("r1.npy"), "<f4", &[40], bytemuck::cast_slice(&x));
    assert_fails(&r1, &good_t, &[], &["r1.npy", "rank 2"]);
    // Vocab 0.
    let v0 = npy(&d.join("v0.npy"), "<f4", &[4, 0], &[]);
    assert_fails(&v0, &good_t, &[], &["v0.npy", "vocab 0"]);
    // Missing file.
    assert_fails(&p("missing.npy"), &good_t, &[], &["missing.npy", "No such file"]);
    // Truncated .npy.
    let full = std::fs::read(&good_l).unwrap();
    std::fs::write(p("trunc.npy"), &full[..full.len() - 7]).unwrap();
    assert_fails(&p("trunc.npy"), &good_t, &[], &["trunc.npy", "truncated"]);
    // Garbage .npy.
    std::fs::write(p("garbage.npy"), b"this is not numpy at all").unwrap();
    assert_fails(&p("garbage.npy"), &good_t, &[], &["garbage.npy", "not a .npy"]);
    // .npy header claiming more bytes than the file has.
    let mut lying = full[..10].to_vec();
    lying[8] = 0xff;
    lying[9] = 0xff;
    std::fs::write(p("header.npy"), &lying).unwrap();
    assert_fails(&p("header.npy"), &good_t, &[], &["header.npy", "runs past the end"]);
    // A .safetensors whose header length is absurd: refused without allocating it.
    let mut absurd = u64::MAX.to_le_bytes().to_vec();
    absurd.extend_from_slice(b"{}");
    std::fs::write(p("absurd.safetensors"), &absurd).unwrap();
    assert_fails(&p("absurd.safetensors"), &good_t, &[], &["absurd.safetensors", "header too large"]);
    let mut big = (1u64 << 40).to_le_bytes().to_vec();
    big.extend_from_slice(b"{}");
    std::fs::write(p("big.safetensors"), &big).unwrap();
    assert_fails(&p("big.safetensors"), &good_t, &[], &["big.safetensors", "bad .safetensors"]);
    // Safetensors with several tensors and none named as expected.
    let two = safetensors(
        &d.join("two.safetensors"),
        &[
            ("a", safetensors::Dtype::F32, vec![4, 10], bytemuck::cast_slice(&x)),
            ("b", safetensors::Dtype::F32, vec![4, 10], bytemuck::cast_slice(&x)),
        ],
    );
    assert_fails(&two, &good_t, &[], &["two.safetensors", "say which"]);
    // Unknown extension.
    std::fs::write(p("x.csv"), b"1,2").unwrap();
    assert_fails(&p("x.csv"), &good_t, &[], &["x.csv", "unknown extension"]);
}

/// Outputs appear all together or not at all, and two flags may not name one file.
#[test]
fn outputs_are_all_or_nothing() {
    let d = dir("outputs");
    let (x, t) = random_case(4, 10, 15, 1.0);
    let l = npy(&d.join("l.npy"), "<f4", &[4, 10], bytemuck::cast_slice(&x));
    let tg = npy(&d.join("t.npy"), "<i8", &[4], bytemuck::cast_slice(&t));
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let base = ["score", "--logits", &l, "--targets", &tg, "--device", "cpu"];

    // The summary cannot be written (its folder is missing): the per-token file, written first
    // in full, must not appear either, and no temporary file may be left.
    let o = run(&[&base[..], &["--per-token", &p("pt.npy"), "--summary-out", &p("missing/s.json")]].concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("s.json"), "{}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "only the inputs may remain: {left:?}");

    // Two outputs naming one file.
    let same = p("same.safetensors");
    let o = run(&[&base[..], &["--per-token", &same, "--per-sequence", &same]].concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--per-token and --per-sequence name the same file"), "{}", stderr(&o));
    let o = run(&["gen", "--rows", "2", "--vocab", "3", "--logits", &same, "--targets", &same]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--logits and --targets name the same file"), "{}", stderr(&o));
    assert!(!Path::new(&same).exists());

    // The same run with a writable summary path writes both.
    let o = run(&[&base[..], &["--per-token", &p("pt.npy"), "--summary-out", &p("s.json")]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.join("pt.npy").exists() && d.join("s.json").exists());
}

#[test]
fn bad_flags_are_refused() {
    let o = run(&["score", "--logits", "a.npy"]);
    assert!(!o.status.success());
    let o = run(&["score", "--logits", "a.npy", "--targets", "b.npy", "--device", "tpu"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("tpu"));
    let o = run(&["bench", "--dtype", "f64"]);
    assert!(!o.status.success());
}

/// Without any Vulkan driver: `--device gpu` is an error, `auto` falls back to the CPU and says so.
#[test]
fn no_adapter_gpu_errors_and_auto_falls_back() {
    let d = dir("noadapter");
    let (x, t) = random_case(4, 10, 15, 1.0);
    let lp = npy(&d.join("l.npy"), "<f4", &[4, 10], bytemuck::cast_slice(&x));
    let tp = npy(&d.join("t.npy"), "<i8", &[4], bytemuck::cast_slice(&t));
    let no_driver = |device: &str| {
        xent()
            .args(["score", "--logits", &lp, "--targets", &tp, "--device", device, "--json"])
            .env("VK_ICD_FILENAMES", "/nonexistent.json")
            .env("VK_DRIVER_FILES", "/nonexistent.json")
            .env("WGPU_BACKEND", "vulkan")
            .output()
            .unwrap()
    };
    let o = no_driver("gpu");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no GPU adapter"), "{}", stderr(&o));
    let o = no_driver("auto");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("using the CPU"));
    assert_eq!(field(&String::from_utf8(o.stdout).unwrap(), "device"), "cpu");
}

#[test]
fn info_bench_and_demo_run() {
    if !gpu_available() {
        return;
    }
    let o = run(&["info"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("max storage binding"));
    let o = run(&["bench", "--rows", "8", "--vocab", "1000", "--iters", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json = String::from_utf8(o.stdout).unwrap();
    assert!(
        json.contains("\"gb_per_s\"") && json.contains("gpu fused kernel") && json.contains("pct_of_ceiling"),
        "{json}"
    );
    let o = run(&["demo", "--rows", "40", "--vocab", "5000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("gpu end-to-end") && text.contains("perplexity"), "{text}");
}

/// `--device auto` takes a hardware GPU, but passes a software adapter (lavapipe, llvmpipe,
/// SwiftShader) over for the CPU path, which is faster on the same cores, and says why on stderr;
/// `--device gpu` still runs on it. `bench --device auto` decides the same way.
#[test]
fn auto_prefers_the_cpu_over_a_software_adapter() {
    let Some(ctx) = common::gpu() else {
        return; // no adapter at all: `no_adapter_gpu_errors_and_auto_falls_back` covers it
    };
    let info = ctx.adapter_info();
    let software = info.device_type == wgpu::DeviceType::Cpu;
    eprintln!("adapter: {} ({:?})", info.name, info.device_type);
    let d = dir("auto");
    let (x, t) = random_case(6, 17, 16, 1.0);
    let lp = npy(&d.join("l.npy"), "<f4", &[6, 17], bytemuck::cast_slice(&x));
    let tp = npy(&d.join("t.npy"), "<i8", &[6], bytemuck::cast_slice(&t));
    let score = |device: &str| run(&["score", "--logits", &lp, "--targets", &tp, "--device", device, "--json"]);

    let o = score("auto");
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let line =
        err.lines().find(|l| l.starts_with("xent: device auto:")).unwrap_or_else(|| panic!("no choice said: {err}"));
    let device = field(&String::from_utf8_lossy(&o.stdout), "device");
    if software {
        assert!(line.contains("using the CPU"), "{line}");
        assert!(line.contains(&info.name) && line.contains("software renderer"), "{line}");
        assert!(line.contains("--device gpu uses it anyway"), "{line}");
        assert_eq!(device, "cpu", "{line}");
    } else {
        assert_eq!(line, format!("xent: device auto: using the GPU ({})", info.name));
        assert_eq!(device, "gpu", "{line}");
    }

    let o = score("gpu");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(field(&String::from_utf8_lossy(&o.stdout), "device"), "gpu");
    assert!(!stderr(&o).contains("device auto"), "{}", stderr(&o));

    let o = run(&[
        "bench", "--rows", "4", "--vocab", "100", "--dtype", "f32", "--iters", "1", "--device", "auto", "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json = String::from_utf8_lossy(&o.stdout);
    assert_eq!(json.contains("gpu fused kernel"), !software, "{json}");
    assert_eq!(json.contains("cpu fast"), software, "{json}");
    assert_eq!(stderr(&o).contains("software renderer"), software, "{}", stderr(&o));
}

/// `XENT_ADAPTER=N` opens the N-th adapter `xent info` lists; an index out of range or not a
/// number is a one-line error. With both software drivers installed (lavapipe and SwiftShader,
/// as CI has them), indices 0 and 1 open two different adapters.
#[test]
fn adapter_by_index() {
    if !gpu_available() {
        return;
    }
    let info = |icd: Option<&str>, index: &str| {
        let mut c = xent();
        c.arg("info").env("XENT_ADAPTER", index);
        if let Some(icd) = icd {
            c.env("VK_ICD_FILENAMES", icd);
        }
        c.output().unwrap()
    };
    // The adapter a run opened, and the list it printed.
    let opened = |o: &Output| {
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let name = out.lines().find_map(|l| l.strip_prefix("adapter ")).unwrap_or_default().trim().to_string();
        let list: Vec<String> = out
            .lines()
            .skip_while(|l| !l.starts_with("adapters ("))
            .skip(1)
            .map(|l| l.trim().split_once("  ").map_or("", |(_, rest)| rest).to_string())
            .collect();
        (name, list)
    };
    let o = info(None, "0");
    assert!(o.status.success(), "{}", stderr(&o));
    let (name, list) = opened(&o);
    assert!(!list.is_empty() && list[0].starts_with(&format!("{name} (")), "{name:?} vs {list:?}");
    for bad in ["99", "first", "-1"] {
        let o = info(None, bad);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains(&format!("XENT_ADAPTER={bad}")) && e.trim().lines().count() == 1, "{e}");
    }
    let icds = ["/usr/share/vulkan/icd.d/lvp_icd.x86_64.json", "/usr/lib/chromium/vk_swiftshader_icd.json"];
    if icds.iter().all(|p| Path::new(p).exists()) {
        let both = icds.join(":");
        let (a, list_a) = opened(&info(Some(&both), "0"));
        let (b, list_b) = opened(&info(Some(&both), "1"));
        assert_eq!(list_a, list_b);
        assert!(list_a.len() >= 2 && a != b, "{a:?} {b:?} {list_a:?}");
        assert!(list_a[0].starts_with(&format!("{a} (")) && list_a[1].starts_with(&format!("{b} (")), "{list_a:?}");
    }
}
