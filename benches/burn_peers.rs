//! burn's own cross-entropy on burn-wgpu against `xent::burn` on the same tensors, in one run,
//! with each side's worst error against the f64 reference; then the cost of the integration
//! itself: `xent::burn::cross_entropy` against `GpuContext::encode` on the same buffers.
//!
//! ```text
//! cargo bench --features burn --bench burn_peers
//! XENT_PEERS_SHAPES=256x32000,64x128256 XENT_PEERS_REPS=10 cargo bench --features burn --bench burn_peers
//! ```
//!
//! Every timing ends with the result on the host (burn's per-token values or its mean read back,
//! xent's per-token nll read back), so each side pays one sync; medians of `XENT_PEERS_REPS`
//! alternating repetitions after one warm-up each.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Device, Int, Tensor, TensorCreationOptions, TensorData};
use xent::{Dtype, EncodeJob, Logits, Options, Targets};

fn main() -> Result<()> {
    let device = xent::burn::device().context("a burn wgpu device xent can run on")?;
    let ctx = xent::burn::context(&device)?;
    let info = ctx.adapter_info();
    println!("adapter: {} ({:?}, driver {} {})", info.name, info.backend, info.driver, info.driver_info);
    let reps: usize = std::env::var("XENT_PEERS_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let shapes = std::env::var("XENT_PEERS_SHAPES").unwrap_or_else(|_| "256x32000,64x128256".into());
    let shapes: Vec<(usize, usize)> = shapes
        .split(',')
        .map(|s| {
            let (r, v) = s.split_once('x').context("shape is ROWSxVOCAB")?;
            Ok((r.parse()?, v.parse()?))
        })
        .collect::<Result<_>>()?;

    println!("\n| shape | dtype | path | median ms | GB/s of logits | wrong rows | worst abs err |");
    println!("|---|---|---|---:|---:|---:|---:|");
    for &(rows, vocab) in &shapes {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            if !device.supports_dtype(dtype) {
                println!("| {rows} × {vocab} | {dtype:?} | burn-wgpu does not support this dtype here | | | | |");
                continue;
            }
            peers(&device, rows, vocab, dtype, reps)?;
        }
    }

    let (rows, vocab) = (256, 128256);
    overhead(&device, rows, vocab, reps)?;
    Ok(())
}

/// Logits, targets, the f64 reference nll per row, and which rows are ignored.
type Case = (Tensor<2>, Tensor<1, Int>, Vec<f64>, Vec<bool>);

/// Logits (normal, sd 2), targets with every 50th row ignored, and the f64 reference nll per row.
fn case(device: &Device, rows: usize, vocab: usize, dtype: DType) -> Result<Case> {
    let mut rng = xent::synth::Rng::new(rows as u64 * 7919 + vocab as u64);
    let x: Vec<f32> = (0..rows * vocab).map(|_| rng.normal() as f32 * 2.0).collect();
    let t: Vec<i64> = (0..rows).map(|r| if r % 50 == 49 { -100 } else { rng.below(vocab) as i64 }).collect();
    let ours = match dtype {
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        _ => Dtype::F32,
    };
    let bytes = ours.encode(&x);
    let data = match ours {
        Dtype::F32 => TensorData::new(x, [rows, vocab]),
        Dtype::F16 => TensorData::new(bytemuck::cast_slice::<u8, half::f16>(&bytes).to_vec(), [rows, vocab]),
        Dtype::BF16 => TensorData::new(bytemuck::cast_slice::<u8, half::bf16>(&bytes).to_vec(), [rows, vocab]),
    };
    let logits = Tensor::<2>::from_data(data, TensorCreationOptions::new(device.clone()).with_dtype(dtype));
    let t32: Vec<i32> = t.iter().map(|&v| v as i32).collect();
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new(t32, [rows]),
        TensorCreationOptions::new(device.clone()).with_dtype(DType::I32),
    );
    let reference =
        xent::reference::score(Logits::from_bytes(&bytes, ours, rows, vocab)?, Targets::I64(&t), &Options::default())?;
    let ignored = reference.iter().map(|r| r.ignored).collect();
    Ok((logits, targets, reference.iter().map(|r| r.nll).collect(), ignored))
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

/// Rows outside `1e-6 + 2e-6·|ref|` (ignored rows must be 0), and the worst absolute error.
fn errors(got: &[f32], want: &[f64], ignored: &[bool]) -> (usize, f64) {
    let mut wrong = 0;
    let mut worst = 0f64;
    for ((g, w), ig) in got.iter().zip(want).zip(ignored) {
        let want = if *ig { 0.0 } else { *w };
        let e = (f64::from(*g) - want).abs();
        if e.is_nan() || e > 1e-6 + 2e-6 * want.abs() {
            wrong += 1;
        }
        if e.is_finite() {
            worst = worst.max(e);
        }
    }
    (wrong, worst)
}

fn peers(device: &Device, rows: usize, vocab: usize, dtype: DType, reps: usize) -> Result<()> {
    let (logits, targets, reference, ignored) = case(device, rows, vocab, dtype)?;
    device.sync().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let bytes = (rows * vocab * dtype.size()) as f64;

    // burn's composed per-token loss: log_softmax over the vocabulary, then a gather (ignored rows
    // masked to 0 afterwards, as burn's CrossEntropyLoss masks pad tokens).
    let mask = targets.clone().equal_elem(-100);
    let burn_tokens = || -> Result<Vec<f32>> {
        let gathered = log_softmax(logits.clone(), 1).gather(1, targets.clone().clamp_min(0).reshape([rows, 1]));
        let nll = gathered.reshape([rows]).neg().mask_fill(mask.clone(), 0.0);
        nll.cast(DType::F32).into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    // burn's CrossEntropyLoss module (mean over non-pad tokens, pad = the ignored rows' class 0
    // here is not what it masks, so it is timed, not checked).
    let loss = burn::nn::loss::CrossEntropyLossConfig::new().init(device);
    let burn_module =
        || -> Result<f32> { Ok(loss.forward(logits.clone(), targets.clone().clamp_min(0)).into_scalar::<f32>()) };
    let xent_tokens = || -> Result<Vec<f32>> {
        let nll = xent::burn::cross_entropy(&logits, &targets)?;
        nll.into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))
    };

    let burn_got = burn_tokens()?;
    let _ = burn_module()?;
    let xent_got = xent_tokens()?;
    let (mut tb, mut tm, mut tx) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let t0 = Instant::now();
        burn_tokens()?;
        tb.push(t0.elapsed());
        let t0 = Instant::now();
        burn_module()?;
        tm.push(t0.elapsed());
        let t0 = Instant::now();
        xent_tokens()?;
        tx.push(t0.elapsed());
    }
    let (bw, be) = errors(&burn_got, &reference, &ignored);
    let (xw, xe) = errors(&xent_got, &reference, &ignored);
    let (mb, mm, mx) = (median(tb), median(tm), median(tx));
    let shape = format!("{rows} × {vocab}");
    println!(
        "| {shape} | {dtype:?} | burn log_softmax + gather (per token) | {mb:.2} | {:.2} | {bw} of {rows} | {be:.2e} |",
        bytes / mb / 1e6
    );
    println!(
        "| {shape} | {dtype:?} | burn CrossEntropyLoss (mean) | {mm:.2} | {:.2} | (not checked) | |",
        bytes / mm / 1e6
    );
    println!(
        "| {shape} | {dtype:?} | xent::burn::cross_entropy (per token) | {mx:.2} | {:.2} | {xw} of {rows} | {xe:.2e} |",
        bytes / mx / 1e6
    );
    println!("| {shape} | {dtype:?} | ratio burn per-token / xent | {:.2}× | | | |", mb / mx);
    Ok(())
}

/// `xent::burn::cross_entropy` (resolve, flush, kernel into a burn tensor) against
/// `GpuContext::encode` over the same buffers found once, each followed by a wait on the queue.
fn overhead(device: &Device, rows: usize, vocab: usize, reps: usize) -> Result<()> {
    let (logits, targets, _, _) = case(device, rows, vocab, DType::F32)?;
    let ctx = xent::burn::context(device)?;
    let wait =
        || ctx.device().poll(wgpu::PollType::wait_indefinitely()).map(|_| ()).map_err(|e| anyhow::anyhow!("{e}"));
    let l = xent::burn::storage(&logits)?;
    let t = xent::burn::int_storage(&targets)?;
    let output = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("bench output"),
        size: rows as u64 * xent::ROW_LOSS_BYTES,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let direct = || -> Result<()> {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        ctx.encode(
            &mut encoder,
            &EncodeJob {
                logits: l.buffer(),
                logits_offset: l.offset(),
                dtype: Dtype::F32,
                row_stride: vocab as u64,
                rows: rows as u64,
                vocab: vocab as u32,
                targets: t.buffer(),
                targets_offset: t.offset(),
                ignore: Some(-100i32 as u32),
                output: &output,
                output_offset: 0,
            },
        )?;
        ctx.queue().submit([encoder.finish()]);
        wait()
    };
    let through_burn = || -> Result<()> {
        let nll = xent::burn::cross_entropy(&logits, &targets)?;
        wait()?;
        drop(nll);
        Ok(())
    };
    direct()?;
    through_burn()?;
    let (mut td, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(5) {
        let t0 = Instant::now();
        direct()?;
        td.push(t0.elapsed());
        let t0 = Instant::now();
        through_burn()?;
        tb.push(t0.elapsed());
    }
    let runs = td.len();
    let (md, mb) = (median(td), median(tb));
    println!("\nintegration overhead at {rows} × {vocab} f32 (kernel + wait on the queue, medians of {runs} runs):");
    println!("  GpuContext::encode on burn's buffers: {md:.2} ms");
    println!("  xent::burn::cross_entropy:            {mb:.2} ms ({:+.1}%)", (mb / md - 1.0) * 100.0);
    Ok(())
}
