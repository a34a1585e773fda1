//! A minimal check of burn's own row reductions on burn-wgpu, against f64 on the host: the ops
//! burn's cross-entropy is built from (`max_dim`, `sum_dim`, `log_softmax`, `gather`), each
//! alone, over several shapes and inputs, repeated (autotune may pick another kernel later).
//!
//! Run: `cargo run --release --features burn --example burn_reduce_repro`
//! (`VK_ICD_FILENAMES=/usr/lib/chromium/vk_swiftshader_icd.json` for SwiftShader).
//! Prints one line per (op, shape, input, repetition): rows wrong at `1e-6 + 2e-6·|ref|`.

use anyhow::Result;
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Device, Distribution, Tensor, TensorCreationOptions, TensorData};

fn main() -> Result<()> {
    let device = Device::default();
    let shapes = [(64usize, 128256usize), (256, 32000), (8, 128256), (64, 32000), (32, 128256)];
    let mut any_wrong = false;
    for &(rows, vocab) in &shapes {
        for input in ["normal sd 2", "uniform [0, 1)"] {
            let x = match input {
                "normal sd 2" => {
                    let mut rng = xent::synth::Rng::new(rows as u64 ^ vocab as u64);
                    let v: Vec<f32> = (0..rows * vocab).map(|_| rng.normal() as f32 * 2.0).collect();
                    Tensor::<2>::from_data(
                        TensorData::new(v, [rows, vocab]),
                        TensorCreationOptions::new(device.clone()).with_dtype(DType::F32),
                    )
                }
                _ => Tensor::<2>::random([rows, vocab], Distribution::Default, &device),
            };
            let host: Vec<f32> = x.clone().into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let row = |r: usize| &host[r * vocab..(r + 1) * vocab];
            let max_ref: Vec<f64> =
                (0..rows).map(|r| row(r).iter().fold(f64::MIN, |m, &v| m.max(f64::from(v)))).collect();
            let sum_ref: Vec<f64> = (0..rows).map(|r| row(r).iter().map(|&v| f64::from(v)).sum()).collect();
            // f32 sums of ~1e5 terms drift by ~1e-6·Σ|x|; a wrong row is off by far more: allow 1e-5·Σ|x|.
            let sum_tol: Vec<f64> =
                (0..rows).map(|r| 1e-5 * row(r).iter().map(|&v| f64::from(v).abs()).sum::<f64>()).collect();
            let lsm0_ref: Vec<f64> = (0..rows)
                .map(|r| {
                    let lse = max_ref[r] + row(r).iter().map(|&v| (f64::from(v) - max_ref[r]).exp()).sum::<f64>().ln();
                    f64::from(row(r)[0]) - lse
                })
                .collect();
            for rep in 0..3 {
                let max = x.clone().max_dim(1).reshape([rows]);
                let sum = x.clone().sum_dim(1).reshape([rows]);
                let lsm0 = log_softmax(x.clone(), 1).narrow(1, 0, 1).reshape([rows]);
                for (op, got, want, rtol) in [
                    ("max_dim", max, &max_ref, 0.0),
                    ("sum_dim", sum, &sum_ref, 0.0),
                    ("log_softmax[:, 0]", lsm0, &lsm0_ref, 2e-6),
                ] {
                    let got: Vec<f32> = got.into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let wrong: Vec<usize> = (0..rows)
                        .filter(|&r| {
                            let e = (f64::from(got[r]) - want[r]).abs();
                            let slack = if op == "sum_dim" { sum_tol[r] } else { 0.0 };
                            e.is_nan() || e > 1e-6 + rtol * want[r].abs() + slack
                        })
                        .collect();
                    any_wrong |= !wrong.is_empty();
                    let first = wrong.first().map(|&r| {
                        let some: Vec<String> = wrong.iter().take(6).map(|r| r.to_string()).collect();
                        format!(" (rows {}..; row {r}: got {} want {:.6})", some.join(","), got[r], want[r])
                    });
                    println!(
                        "{op:>18} {rows:>4} x {vocab:<6} {input:<15} rep {rep}: {} of {rows} rows wrong{}",
                        wrong.len(),
                        first.unwrap_or_default()
                    );
                }
            }
        }
    }
    println!("{}", if any_wrong { "burn gave wrong rows" } else { "burn's reductions agree with f64 everywhere" });
    Ok(())
}
