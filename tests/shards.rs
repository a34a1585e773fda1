//! Scoring at scale: shards, globs and directories, exact merges, `--shift`, per-sequence and
//! per-token outputs, and hostile inputs (shards that disagree, files changed while read).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{random_case, to_bytes};
use xent::{Dtype, Options};

fn xent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xent")).args(args).env("XDG_RUNTIME_DIR", std::env::temp_dir()).output().unwrap()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xent-shards-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn err_line(o: &Output) -> String {
    assert!(!o.status.success(), "expected failure");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!e.contains("panicked"), "{e}");
    e.lines().find(|l| l.starts_with("xent: error:")).unwrap_or_else(|| panic!("no error line: {e}")).to_string()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap()
}

fn devices() -> Vec<&'static str> {
    if common::gpu().is_some() {
        vec!["cpu", "gpu"]
    } else {
        vec!["cpu"]
    }
}

/// Writes shard `i`: `rows` x `vocab` logits of `dtype` and i64 targets.
fn shard(d: &Path, i: usize, rows: usize, vocab: usize, dtype: Dtype) -> (PathBuf, PathBuf) {
    let (x, mut t) = random_case(rows, vocab, 100 + i as u64, 3.0);
    t[rows / 3] = -100;
    let l = d.join(format!("logits-{i:02}.safetensors"));
    let st = match dtype {
        Dtype::F32 => "F32",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
    };
    let bytes = to_bytes(&x, dtype);
    let mut file = xent::io::safetensors_header("logits", st, &[rows, vocab], bytes.len());
    file.extend_from_slice(&bytes);
    std::fs::write(&l, file).unwrap();
    let tp = d.join(format!("targets-{i:02}.npy"));
    xent::io::write_npy(&tp, "<i8", &[rows], bytemuck::cast_slice(&t)).unwrap();
    (l, tp)
}

#[test]
fn one_run_over_shards_equals_the_merge_of_shard_summaries_exactly() {
    let d = dir("merge");
    let paths: Vec<_> = (0..3).map(|i| shard(&d, i, 37 + 11 * i, 3001, Dtype::BF16)).collect();
    for device in devices() {
        // Small chunks so that shards span several chunks and end in partial ones.
        let all = ok(&xent(&[
            "score",
            "--logits",
            s(&d.join("logits-*.safetensors")),
            "--targets",
            s(&d.join("targets-*.npy")),
            "--device",
            device,
            "--json",
            "--chunk-mib",
            "1",
        ]));
        let mut summaries = Vec::new();
        for (i, (l, t)) in paths.iter().enumerate() {
            let out = d.join(format!("{device}-s{i}.json"));
            ok(&xent(&[
                "score",
                "--logits",
                s(l),
                "--targets",
                s(t),
                "--device",
                device,
                "--summary-out",
                s(&out),
                "--chunk-mib",
                "1",
            ]));
            summaries.push(out);
        }
        let mut args = vec!["merge", "--json"];
        args.extend(summaries.iter().map(|p| s(p)));
        let merged = json(&ok(&xent(&args)));
        let all = json(&all);
        for k in [
            "tokens",
            "ignored",
            "correct",
            "mean_nll",
            "bits_per_token",
            "perplexity",
            "ppl_stderr",
            "accuracy",
            "sum_nll_fixed",
            "sum_nll_sq_fixed",
        ] {
            assert_eq!(all[k], merged[k], "{device}: {k}");
        }
        assert_eq!(all["tokens"], 37 + 48 + 59 - 3);
    }
}

#[test]
fn directory_glob_and_list_give_the_same_stable_order() {
    let d = dir("order");
    let paths: Vec<_> = (0..3).map(|i| shard(&d, i, 9, 50, Dtype::F32)).collect();
    let ld = d.join("l");
    let td = d.join("t");
    std::fs::create_dir_all(&ld).unwrap();
    std::fs::create_dir_all(&td).unwrap();
    for (l, t) in &paths {
        std::fs::copy(l, ld.join(l.file_name().unwrap())).unwrap();
        std::fs::copy(t, td.join(t.file_name().unwrap())).unwrap();
    }
    let per_token = |args: &[&str], out: &Path| {
        let mut a = vec!["score", "--device", "cpu", "--quiet", "--per-token", s(out)];
        a.extend_from_slice(args);
        ok(&xent(&a));
        std::fs::read(out).unwrap()
    };
    let listed: Vec<&str> = ["--logits"]
        .into_iter()
        .chain(paths.iter().map(|p| s(&p.0)))
        .chain(["--targets"])
        .chain(paths.iter().map(|p| s(&p.1)))
        .collect();
    let a = per_token(&listed, &d.join("a.npy"));
    let b = per_token(&["--logits", s(&ld), "--targets", s(&td)], &d.join("b.npy"));
    let c = per_token(&["--logits", s(&d.join("logits-*")), "--targets", s(&d.join("targets-*"))], &d.join("c.npy"));
    assert_eq!(a, b);
    assert_eq!(a, c);
}

/// `--shift` on [B, T, V] logits with [B, T] labels: position t against label t+1, the last position
/// of each sequence dropped; per-token and per-sequence results checked against the reference.
#[test]
fn shift_per_token_and_per_sequence_match_the_reference() {
    let d = dir("shift");
    let (b, t_len, vocab) = (4usize, 9usize, 777usize);
    let (x, mut labels) = random_case(b * t_len, vocab, 5, 2.0);
    labels[3] = -100; // an ignored label inside sequence 0
    let bytes = to_bytes(&x, Dtype::F32);
    let lp = d.join("logits.safetensors");
    let mut file = xent::io::safetensors_header("logits", "F32", &[b, t_len, vocab], bytes.len());
    file.extend_from_slice(&bytes);
    std::fs::write(&lp, file).unwrap();
    let tp = d.join("labels.npy");
    xent::io::write_npy(&tp, "<i8", &[b, t_len], bytemuck::cast_slice(&labels)).unwrap();

    // The reference, row by row, with the shift done by hand.
    let mut want_tokens = Vec::new();
    let mut want_seq = vec![(0u64, 0f64, true); b];
    for (q, seq) in want_seq.iter_mut().enumerate() {
        for p in 0..t_len - 1 {
            let r = q * t_len + p;
            let label = labels[r + 1];
            let target = (label != -100).then_some(label as usize);
            let row = xent::reference::row(&x[r * vocab..(r + 1) * vocab], target);
            want_tokens.push(row);
            if !row.ignored {
                seq.0 += 1;
                seq.1 -= row.nll;
                seq.2 &= row.correct;
            }
        }
    }
    for device in devices() {
        let pt = d.join(format!("{device}-tokens.safetensors"));
        let ps = d.join(format!("{device}-seq.jsonl"));
        let out = ok(&xent(&[
            "score",
            "--logits",
            s(&lp),
            "--targets",
            s(&tp),
            "--shift",
            "--device",
            device,
            "--json",
            "--per-token",
            s(&pt),
            "--per-sequence",
            s(&ps),
        ]));
        let summary = json(&out);
        assert_eq!(summary["tokens"], (b * (t_len - 1) - 1) as u64, "{device}");
        assert_eq!(summary["ignored"], 1, "{device}: dropped positions are not counted as ignored");
        let file = std::fs::read(&pt).unwrap();
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        let nll: Vec<f32> = bytemuck::pod_collect_to_vec(st.tensor("nll").unwrap().data());
        let correct = st.tensor("correct").unwrap();
        assert_eq!(nll.len(), want_tokens.len());
        for (i, (g, w)) in nll.iter().zip(&want_tokens).enumerate() {
            assert!(
                common::close(f64::from(*g), w.nll, common::ATOL, common::RTOL),
                "{device} row {i}: {g} vs {}",
                w.nll
            );
            assert_eq!(correct.data()[i] == 1, w.correct, "{device} row {i}");
        }
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&ps).unwrap().lines().map(json).collect();
        assert_eq!(lines.len(), b);
        for (q, (line, want)) in lines.iter().zip(&want_seq).enumerate() {
            assert_eq!(line["tokens"], want.0, "{device} sequence {q}");
            let got = line["sum_logprob"].as_f64().unwrap();
            assert!((got - want.1).abs() <= 1e-5 * want.1.abs().max(1.0), "{device} sequence {q}: {got} vs {}", want.1);
            assert_eq!(line["is_greedy"], want.2, "{device} sequence {q}");
        }
    }
}

#[test]
fn offsets_define_sequences() {
    let d = dir("offsets");
    let (l, t) = shard(&d, 0, 10, 20, Dtype::F32);
    let off = d.join("off.npy");
    xent::io::write_npy(&off, "<i8", &[4], bytemuck::cast_slice(&[0i64, 3, 3, 10])).unwrap();
    let ps = d.join("seq.safetensors");
    ok(&xent(&[
        "score",
        "--logits",
        s(&l),
        "--targets",
        s(&t),
        "--device",
        "cpu",
        "--offsets",
        s(&off),
        "--per-sequence",
        s(&ps),
    ]));
    let tokens = xent::io::open(&ps, Some("tokens"), &[]).unwrap();
    let counts: Vec<i64> = bytemuck::pod_collect_to_vec(tokens.bytes());
    // Row 3 (= 10 / 3) is ignored by `shard`: it falls in the third span.
    assert_eq!(counts, vec![3, 0, 6]);
    // An empty span at the end is still a sequence.
    let trailing = d.join("trailing.npy");
    xent::io::write_npy(&trailing, "<i8", &[4], bytemuck::cast_slice(&[0i64, 3, 10, 10])).unwrap();
    let ps2 = d.join("seq2.jsonl");
    ok(&xent(&[
        "score",
        "--logits",
        s(&l),
        "--targets",
        s(&t),
        "--device",
        "cpu",
        "--offsets",
        s(&trailing),
        "--per-sequence",
        s(&ps2),
    ]));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&ps2).unwrap().lines().map(json).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["tokens"], 0);
    let bad = d.join("bad.npy");
    xent::io::write_npy(&bad, "<i8", &[3], bytemuck::cast_slice(&[0i64, 5, 9])).unwrap();
    let e = err_line(&xent(&["score", "--logits", s(&l), "--targets", s(&t), "--device", "cpu", "--offsets", s(&bad)]));
    assert!(e.contains("offsets must rise from 0 to the total number of rows (10)"), "{e}");
}

#[test]
fn hostile_shards_are_refused() {
    let d = dir("hostile");
    let (l0, t0) = shard(&d, 0, 8, 100, Dtype::F32);
    let (l1, t1) = shard(&d, 1, 8, 101, Dtype::F32);
    let (l2, t2) = shard(&d, 2, 8, 100, Dtype::BF16);
    let e = err_line(&xent(&["score", "--logits", s(&l0), s(&l1), "--targets", s(&t0), s(&t1), "--device", "cpu"]));
    assert!(e.contains("logits-01") && e.contains("vocab 101") && e.contains("disagrees"), "{e}");
    let e = err_line(&xent(&["score", "--logits", s(&l0), s(&l2), "--targets", s(&t0), s(&t2), "--device", "cpu"]));
    assert!(e.contains("logits-02") && e.contains("bf16"), "{e}");
    // Targets shorter than the logits.
    let short = d.join("short.npy");
    xent::io::write_npy(&short, "<i8", &[7], bytemuck::cast_slice(&[0i64; 7])).unwrap();
    let e = err_line(&xent(&["score", "--logits", s(&l0), "--targets", s(&short), "--device", "cpu"]));
    assert!(e.contains("short.npy") && e.contains("7 targets") && e.contains("8 rows"), "{e}");
    // Counts of files that differ; an empty shard list.
    let e = err_line(&xent(&["score", "--logits", s(&l0), s(&l1), "--targets", s(&t0), "--device", "cpu"]));
    assert!(e.contains("2 logits files but 1 targets file"), "{e}");
    let e =
        err_line(&xent(&["score", "--logits", s(&d.join("nothing-*.npy")), "--targets", s(&t0), "--device", "cpu"]));
    assert!(e.contains("matches no files"), "{e}");
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = err_line(&xent(&["score", "--logits", s(&empty), "--targets", s(&t0), "--device", "cpu"]));
    assert!(e.contains("holds no .npy or .safetensors"), "{e}");
    // A file truncated in the middle of its data.
    let full = std::fs::read(&l0).unwrap();
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &full[..full.len() - 100]).unwrap();
    let e = err_line(&xent(&["score", "--logits", s(&cut), "--targets", s(&t0), "--device", "cpu"]));
    assert!(e.contains("cut.safetensors"), "{e}");
    // Bad outputs are refused before any work, and nothing is left behind.
    let e = err_line(&xent(&["score", "--logits", s(&l0), "--targets", s(&t0), "--per-sequence", s(&d.join("x.csv"))]));
    assert!(e.contains("unknown output extension"), "{e}");
    let e =
        err_line(&xent(&["score", "--logits", s(&l0), "--targets", s(&t0), "--per-sequence", s(&d.join("x.jsonl"))]));
    assert!(e.contains("--per-sequence needs [B, T, V] logits"), "{e}");
    assert!(!d.join("x.jsonl").exists());
    // Merge refuses files that are not summaries.
    let e = err_line(&xent(&["merge", s(&t0)]));
    assert!(e.contains("targets-00.npy") && e.contains("not JSON"), "{e}");
    let fake = d.join("fake.json");
    std::fs::write(&fake, "{\"tokens\": 3}").unwrap();
    let e = err_line(&xent(&["merge", s(&fake)]));
    assert!(e.contains("fake.json") && e.contains("not a valid summary"), "{e}");
}

/// A file that changes or shrinks after it was opened is an error when read, never a crash or a
/// silently wrong answer.
#[test]
fn files_changed_while_read_are_errors() {
    let d = dir("changed");
    let (l, t) = shard(&d, 0, 16, 64, Dtype::F32);
    let shards = vec![xent::eval::Shard {
        logits: xent::io::open(&l, None, &["logits"]).unwrap(),
        targets: xent::io::open(&t, None, &["targets"]).unwrap(),
    }];
    // Appending changes the length; the next read is refused.
    let mut f = std::fs::OpenOptions::new().append(true).open(&l).unwrap();
    std::io::Write::write_all(&mut f, b"more").unwrap();
    drop(f);
    let opts = xent::eval::EvalOptions { options: Options::default(), ..Default::default() };
    let e = xent::eval::evaluate(xent::eval::Engine::Cpu, &shards, &opts, &mut |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("changed while being read"), "{e}");
    // Truncation after opening: refused as well.
    let (l, t) = shard(&d, 1, 16, 64, Dtype::F32);
    let logits = xent::io::open(&l, None, &["logits"]).unwrap();
    std::fs::OpenOptions::new().write(true).open(&l).unwrap().set_len(200).unwrap();
    let mut buf = vec![0u8; 64 * 4];
    let e = logits.read_data(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("changed while being read"), "{e}");
    let _ = t;
}

/// Both CPU reading paths — blocks scored straight from the page cache by every thread, and a
/// chunk read whole for few long rows — agree with the reference, for every dtype.
#[test]
fn cpu_reading_paths_match_the_reference() {
    let d = dir("cpu-paths");
    for (i, (rows, vocab)) in [(40usize, 70_001usize), (1, 70_001), (300, 1000)].into_iter().enumerate() {
        for (j, dtype) in [Dtype::F32, Dtype::F16, Dtype::BF16].into_iter().enumerate() {
            let (l, t) = shard(&d, 10 * i + j, rows, vocab, dtype);
            let shards = vec![xent::eval::Shard {
                logits: xent::io::open(&l, None, &["logits"]).unwrap(),
                targets: xent::io::open(&t, None, &["targets"]).unwrap(),
            }];
            let opts = xent::eval::EvalOptions { per_token: true, per_token_extra: true, ..Default::default() };
            let got = xent::eval::evaluate(xent::eval::Engine::Cpu, &shards, &opts, &mut |_, _| Ok(())).unwrap();
            let logits = shards[0].logits.logits().unwrap();
            let want =
                xent::reference::score(logits, shards[0].targets.targets().unwrap(), &Options::default()).unwrap();
            let pt = got.per_token.unwrap();
            for (r, w) in want.iter().enumerate() {
                assert!(
                    common::close(f64::from(pt.nll[r]), w.nll, common::ATOL, common::RTOL),
                    "{rows} x {vocab} {dtype} row {r}: {} vs {}",
                    pt.nll[r],
                    w.nll
                );
                assert_eq!(pt.correct[r] == 1, w.correct, "{rows} x {vocab} {dtype} row {r}");
            }
        }
    }
}

/// The zero-copy path checks the file before each block: a truncation is an error.
#[test]
fn mapped_reads_refuse_a_truncated_file() {
    let d = dir("mapped");
    let (l, _) = shard(&d, 0, 8, 1000, Dtype::F32);
    let logits = xent::io::open(&l, None, &["logits"]).unwrap();
    assert!(logits.mapped(0, 4000).is_ok());
    std::fs::OpenOptions::new().write(true).open(&l).unwrap().set_len(1000).unwrap();
    let e = logits.mapped(0, 4000).unwrap_err();
    assert!(e.to_string().contains("changed while being read"), "{e}");
}

/// `--shift` with [B*T, V] logits and [B, T] labels takes the sequences from the labels' shape:
/// the same results as [B, T, V] logits.
#[test]
fn shift_takes_sequences_from_rank2_labels() {
    let d = dir("shift2");
    let (b, t_len, vocab) = (3usize, 5usize, 40usize);
    let (x, labels) = random_case(b * t_len, vocab, 6, 2.0);
    let bytes = to_bytes(&x, Dtype::F32);
    let tp = d.join("labels.npy");
    xent::io::write_npy(&tp, "<i8", &[b, t_len], bytemuck::cast_slice(&labels)).unwrap();
    let mut outs = Vec::new();
    for (name, shape) in [("r3.npy", vec![b, t_len, vocab]), ("r2.npy", vec![b * t_len, vocab])] {
        let lp = d.join(name);
        xent::io::write_npy(&lp, "<f4", &shape, &bytes).unwrap();
        let out = d.join(format!("{name}.out.npy"));
        let summary = json(&ok(&xent(&[
            "score",
            "--logits",
            s(&lp),
            "--targets",
            s(&tp),
            "--shift",
            "--device",
            "cpu",
            "--json",
            "--per-token",
            s(&out),
        ])));
        assert_eq!(summary["tokens"], (b * (t_len - 1)) as u64, "{name}");
        outs.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
}
