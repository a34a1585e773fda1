//! Criterion benches over (rows, vocab, dtype): the GPU kernel on resident data (timestamp
//! queries when the adapter has them, inputs rotated over 256 MiB), the unfused baseline (f32),
//! GPU end-to-end from host memory, the fast CPU path and the CPU reference — in one group per
//! shape, so each comparison is one run.
//!
//! The `kld` groups time KL divergence between generated pairs of models' logits (the test is the
//! base plus noise of 0.01), throughput counted over both inputs: GPU end-to-end from host memory
//! and the fast CPU path (the resident-kernel and unfused GPU rows are still to join them).
//!
//! `cargo bench` — sizes are kept modest so that a software adapter (lavapipe) finishes;
//! `cargo bench -- kld` runs the KLD groups alone.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use xent::{Dtype, GpuContext, Logits, Options, Targets};

fn forward(c: &mut Criterion) {
    let gpu = GpuContext::new().ok();
    if gpu.is_none() {
        eprintln!("no GPU adapter: benchmarking the CPU paths only");
    }
    let opts = Options::default();
    for (rows, vocab, dtype) in
        [(256usize, 128_256usize, Dtype::F32), (256, 128_256, Dtype::BF16), (2048, 32_000, Dtype::F32)]
    {
        let (x, t) = xent::synth::eval_set(rows, vocab, 5, -100);
        let bytes = dtype.encode(&x);
        let logits = Logits::from_bytes(&bytes, dtype, rows, vocab).expect("shape");
        let targets = xent::validate_targets(Targets::I64(&t), rows, vocab, &opts).expect("targets");
        let mut group = c.benchmark_group(format!("forward/{rows}x{vocab}/{dtype}"));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
        if let Some(ctx) = &gpu {
            let resident = xent::bench::Resident::rotating(ctx, logits, &targets, 256 << 20).expect("upload");
            group.bench_function(BenchmarkId::new("gpu_kernel", ""), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = resident.run().expect("run");
                        total += Duration::from_secs_f64(t.best());
                    }
                    total
                })
            });
            if let Ok(unfused) = xent::bench::Unfused::new(ctx, logits, &targets) {
                group.bench_function(BenchmarkId::new("gpu_unfused_baseline", ""), |b| {
                    b.iter_custom(|iters| {
                        (0..iters).map(|_| Duration::from_secs_f64(unfused.run().expect("run").best())).sum()
                    })
                });
            }
            group.bench_function(BenchmarkId::new("gpu_end_to_end", ""), |b| {
                b.iter(|| ctx.score(logits, Targets::I64(&t), &opts).expect("score"))
            });
        }
        group.bench_function(BenchmarkId::new("cpu_fast", ""), |b| {
            b.iter(|| xent::cpu::score(logits, Targets::I64(&t), &opts).expect("score"))
        });
        group.bench_function(BenchmarkId::new("cpu_reference", ""), |b| {
            b.iter(|| xent::reference::score(logits, Targets::I64(&t), &opts).expect("score"))
        });
        group.finish();
    }
}

fn kld(c: &mut Criterion) {
    let gpu = GpuContext::new().ok();
    let opts = Options::default();
    for (rows, vocab, dtype) in
        [(64usize, 32_000usize, Dtype::F32), (64, 32_000, Dtype::BF16), (8, 128_256, Dtype::F32)]
    {
        let (x, y, t) = xent::synth::kld_pair(rows, vocab, 5, 0.01);
        let (base_bytes, test_bytes) = (dtype.encode(&x), dtype.encode(&y));
        let base = Logits::from_bytes(&base_bytes, dtype, rows, vocab).expect("shape");
        let test = Logits::from_bytes(&test_bytes, dtype, rows, vocab).expect("shape");
        let mut group = c.benchmark_group(format!("kld/{rows}x{vocab}/{dtype}"));
        group.throughput(Throughput::Bytes((base_bytes.len() + test_bytes.len()) as u64));
        group.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
        if let Some(ctx) = &gpu {
            group.bench_function(BenchmarkId::new("gpu_end_to_end", ""), |b| {
                b.iter(|| ctx.kld(base, test, Some(Targets::I64(&t)), &opts).expect("kld"))
            });
        }
        group.bench_function(BenchmarkId::new("cpu_fast", ""), |b| {
            b.iter(|| xent::kld::cpu::kld(base, test, Some(Targets::I64(&t)), &opts).expect("kld"))
        });
        group.finish();
    }
}

criterion_group!(benches, forward, kld);
criterion_main!(benches);
