//! `xent::burn` against the f64 reference: burn tensors on burn's wgpu device, read in place.
//!
//! Every device here is registered through `xent::burn::register_with`, each with its own wgpu
//! device, so that forced plans and small bindings can be checked; burn's default device is
//! never set up through xent in this binary (the unregistered-device test relies on it).

mod common;

use std::sync::OnceLock;

use burn::tensor::{DType, Device, Int, Tensor, TensorCreationOptions, TensorData};
use common::{all_plans, check_rows, close, random_case, small_bindings, ATOL, RTOL};
use xent::{Dtype, Error, GpuContext, Logits, Options, Targets};

/// A burn device on its own wgpu device with `configure` applied to its context, or `None` (a loud
/// skip; a failure under `XENT_REQUIRE_GPU=1`) without an adapter.
fn new_device(configure: impl FnOnce(&mut GpuContext)) -> Option<Device> {
    let setup = match xent::burn::setup_of_default_adapter() {
        Ok(setup) => setup,
        Err(e) => {
            if std::env::var("XENT_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("XENT_REQUIRE_GPU=1 but no GPU adapter: {e}");
            }
            eprintln!("\n!!!!! SKIPPING BURN TEST: no GPU adapter ({e}) !!!!!\n");
            return None;
        }
    };
    let mut ctx = GpuContext::from_device(setup.device.clone(), setup.queue.clone());
    configure(&mut ctx);
    Some(xent::burn::register_with(setup, ctx).expect("register a fresh setup"))
}

fn device() -> Option<&'static Device> {
    static DEVICE: OnceLock<Option<Device>> = OnceLock::new();
    DEVICE.get_or_init(|| new_device(|_| {})).as_ref()
}

/// Logits of `dtype` on `device` holding exactly `values` rounded to `dtype`, and those rounded
/// values' bytes for the reference.
fn logits_tensor<const D: usize>(
    values: &[f32],
    shape: [usize; D],
    dtype: Dtype,
    device: &Device,
) -> (Tensor<D>, Vec<u8>) {
    let bytes = dtype.encode(values);
    let data = match dtype {
        Dtype::F32 => TensorData::new(values.to_vec(), shape),
        Dtype::F16 => TensorData::new(bytemuck::cast_slice::<u8, half::f16>(&bytes).to_vec(), shape),
        Dtype::BF16 => TensorData::new(bytemuck::cast_slice::<u8, half::bf16>(&bytes).to_vec(), shape),
    };
    let burn_dtype = match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
    };
    let tensor = Tensor::<D>::from_data(data, TensorCreationOptions::new(device.clone()).with_dtype(burn_dtype));
    assert_eq!(tensor.dtype(), burn_dtype, "burn kept the dtype");
    (tensor, bytes)
}

fn targets_tensor<const E: usize>(targets: &[i64], shape: [usize; E], device: &Device) -> Tensor<E, Int> {
    let t: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
    Tensor::<E, Int>::from_data(
        TensorData::new(t, shape),
        TensorCreationOptions::new(device.clone()).with_dtype(DType::I32),
    )
}

/// Checks `score` (records) and `cross_entropy_with` (the nll tensor) against the reference.
fn check<const D: usize, const E: usize>(
    logits: &Tensor<D>,
    targets: &Tensor<E, Int>,
    bytes: &[u8],
    dtype: Dtype,
    host_targets: &[i64],
    opts: &Options,
) -> Result<f64, String> {
    let dims = logits.dims();
    let vocab = dims[D - 1];
    let rows = host_targets.len();
    let x = Logits::from_bytes(bytes, dtype, rows, vocab).map_err(|e| e.to_string())?;
    let want = xent::reference::score(x, Targets::I64(host_targets), opts).map_err(|e| e.to_string())?;
    let got = xent::burn::score(logits, targets, opts).map_err(|e| e.to_string())?;
    let worst = check_rows(&got, &want, ATOL, RTOL).map_err(|e| format!("records: {e}"))?;
    let nll = xent::burn::cross_entropy_with(logits, targets, opts).map_err(|e| e.to_string())?;
    if nll.dims()[..] != dims[..D - 1] {
        return Err(format!("nll has shape {:?}, want {:?}", nll.dims(), &dims[..D - 1]));
    }
    let nll: Vec<f32> = nll.into_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    for (i, (g, w)) in nll.iter().zip(&want).enumerate() {
        if !close(f64::from(*g), w.nll, ATOL, RTOL) {
            return Err(format!("nll tensor row {i}: got {g} want {}", w.nll));
        }
    }
    Ok(worst)
}

#[test]
fn matches_the_reference_over_shapes_dtypes_and_ranks() {
    let Some(device) = device() else { return };
    let opts = Options::default();
    for (rows, vocab) in [(1, 1), (3, 7), (6, 31), (17, 1000), (4, 32000), (2, 128256)] {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let (x, mut t) = random_case(rows, vocab, (rows * 131 + vocab) as u64, 3.0);
            if rows > 2 {
                t[1] = -100;
            }
            let (logits, bytes) = logits_tensor(&x, [rows, vocab], dtype, device);
            let targets = targets_tensor(&t, [rows], device);
            check(&logits, &targets, &bytes, dtype, &t, &opts)
                .unwrap_or_else(|e| panic!("[{rows}, {vocab}] {dtype:?}: {e}"));
            if rows % 3 == 0 {
                let (logits, _) = logits_tensor(&x, [3, rows / 3, vocab], dtype, device);
                let targets = targets_tensor(&t, [3, rows / 3], device);
                check(&logits, &targets, &bytes, dtype, &t, &opts)
                    .unwrap_or_else(|e| panic!("[3, {}, {vocab}] {dtype:?}: {e}", rows / 3));
            }
        }
    }
}

#[test]
fn every_plan_on_burn_buffers() {
    for plan in all_plans() {
        let Some(device) = new_device(|ctx| ctx.force_plan(plan)) else { return };
        for (rows, vocab) in [(64, 1000), (3, 32000), (1, 50257)] {
            let (x, mut t) = random_case(rows, vocab, 7 + rows as u64, 2.0);
            t[0] = -100;
            let (logits, bytes) = logits_tensor(&x, [rows, vocab], Dtype::F32, &device);
            let targets = targets_tensor(&t, [rows], &device);
            check(&logits, &targets, &bytes, Dtype::F32, &t, &Options::default())
                .unwrap_or_else(|e| panic!("{plan:?} [{rows}, {vocab}]: {e}"));
        }
    }
}

#[test]
fn a_tensor_larger_than_one_binding_is_chunked() {
    let Some(device) = new_device(small_bindings) else { return };
    for dtype in [Dtype::F32, Dtype::BF16] {
        let (rows, vocab) = (37, 1000);
        let (x, t) = random_case(rows, vocab, 99, 4.0);
        let (logits, bytes) = logits_tensor(&x, [rows, vocab], dtype, &device);
        let targets = targets_tensor(&t, [rows], &device);
        check(&logits, &targets, &bytes, dtype, &t, &Options::default()).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
    }
}

#[test]
fn pending_lazy_work_runs_before_the_kernel_and_later_work_after() {
    let Some(device) = device() else { return };
    let (rows, vocab) = (24, 5000);
    let (x, _) = random_case(rows, vocab, 5, 1.0);
    let (base, _) = logits_tensor(&x, [rows, vocab], Dtype::F32, device);
    // Queued, not run: burn's fusion layer holds these until something needs them.
    let logits = base.mul_scalar(2.0).add_scalar(1.0);
    let targets = Tensor::<1, Int>::arange(0..rows as i64, device).mul_scalar(37).remainder_scalar(vocab as i64);
    let host: Vec<f32> = x.iter().map(|v| v * 2.0 + 1.0).collect();
    let t: Vec<i64> = (0..rows as i64).map(|r| r * 37 % vocab as i64).collect();
    let nll = xent::burn::cross_entropy(&logits, &targets).expect("xent on lazy tensors");
    // Work recorded after ours, on our output.
    let total = nll.clone().sum().into_scalar::<f32>();
    let want =
        xent::reference::score(Logits::f32(&host, vocab).unwrap(), Targets::I64(&t), &Options::default()).unwrap();
    let want_total: f64 = want.iter().map(|r| r.nll).sum();
    assert!(close(f64::from(total), want_total, 1e-4, 1e-5), "sum of nll {total} vs reference {want_total}");
    let got: Vec<f32> = nll.into_data().try_to_vec::<f32>().unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(close(f64::from(*g), w.nll, ATOL, RTOL), "row {i}: {g} vs {}", w.nll);
    }
}

#[test]
fn targets_of_other_integer_types_and_a_custom_ignore_index() {
    let Some(device) = device() else { return };
    let (rows, vocab) = (9, 300);
    let (x, mut t) = random_case(rows, vocab, 11, 2.0);
    t[2] = 7;
    t[5] = 7;
    let (logits, bytes) = logits_tensor(&x, [rows, vocab], Dtype::F32, device);
    let opts = Options { ignore_index: 7 };
    for dtype in [DType::I32, DType::I64, DType::U32] {
        if !device.supports_dtype(dtype) {
            // SwiftShader has no 64-bit integers in shaders: burn cannot hold i64 tensors there.
            eprintln!("burn cannot hold {dtype:?} tensors on this adapter: skipped");
            continue;
        }
        let targets = targets_tensor(&t, [rows], device).cast(dtype);
        assert_eq!(targets.dtype(), dtype);
        check(&logits, &targets, &bytes, Dtype::F32, &t, &opts).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        let rows_out = xent::burn::score(&logits, &targets, &opts).unwrap();
        assert!(rows_out[2].ignored() && rows_out[5].ignored() && !rows_out[0].ignored());
    }
}

#[test]
fn summary_matches_the_cpu_path() {
    let Some(device) = device() else { return };
    let (rows, vocab) = (50, 2000);
    let (x, mut t) = random_case(rows, vocab, 3, 2.0);
    t[10] = -100;
    let (logits, _) = logits_tensor(&x, [rows, vocab], Dtype::F32, device);
    let targets = targets_tensor(&t, [rows], device);
    let got = xent::burn::summary(&logits, &targets, &Options::default()).unwrap();
    let cpu = xent::cpu::score(Logits::f32(&x, vocab).unwrap(), Targets::I64(&t), &Options::default()).unwrap();
    let want = xent::Summary::of(&cpu);
    assert_eq!((got.tokens, got.ignored), (want.tokens, want.ignored));
    assert!(close(got.mean_nll(), want.mean_nll(), 1e-6, 1e-6), "{} vs {}", got.mean_nll(), want.mean_nll());
}

#[test]
fn bad_inputs_are_clear_errors() {
    let Some(device) = device() else { return };
    let (rows, vocab) = (4, 10);
    let (x, t) = random_case(rows, vocab, 1, 1.0);
    let (logits, _) = logits_tensor(&x, [rows, vocab], Dtype::F32, device);

    // A transposed view is not contiguous.
    let transposed = logits.clone().swap_dims(0, 1);
    let e = xent::burn::cross_entropy(&transposed, &targets_tensor(&[0; 10], [10], device)).unwrap_err();
    assert!(matches!(e, Error::Engine(_)) && e.to_string().contains("not contiguous"), "{e}");

    // Shapes.
    let e = xent::burn::cross_entropy(&logits, &targets_tensor(&t[..3], [3], device)).unwrap_err();
    assert!(matches!(e, Error::Shape(_)) && e.to_string().contains("disagree"), "{e}");
    let e = xent::burn::cross_entropy(&logits, &targets_tensor(&t, [2, 2], device)).unwrap_err();
    assert!(matches!(e, Error::Shape(_)) && e.to_string().contains("rank"), "{e}");

    // A target out of range: an error from `score`, NaN from `cross_entropy`.
    let bad = targets_tensor(&[1, 2, 10, 3], [4], device);
    let e = xent::burn::score(&logits, &bad, &Options::default()).unwrap_err();
    assert!(matches!(e, Error::TargetOutOfRange { row: 2, target: 10, vocab: 10 }), "{e}");
    let nll: Vec<f32> = xent::burn::cross_entropy(&logits, &bad).unwrap().into_data().try_to_vec::<f32>().unwrap();
    assert!(nll[2].is_nan() && nll[0].is_finite());

    // An empty batch is an empty result.
    let empty = Tensor::<2>::zeros([0, vocab], device);
    let nll = xent::burn::cross_entropy(&empty, &targets_tensor(&[], [0], device)).unwrap();
    assert_eq!(nll.dims(), [0]);

    // A wgpu device xent was not told about (burn's default, set up by burn itself).
    let foreign = Device::default();
    let (logits, _) = logits_tensor(&x, [rows, vocab], Dtype::F32, &foreign);
    let e = xent::burn::cross_entropy(&logits, &targets_tensor(&t, [rows], &foreign)).unwrap_err();
    assert!(matches!(e, Error::Engine(_)) && e.to_string().contains("not set up through xent"), "{e}");
    // ... and it cannot be set up afterwards.
    let e = xent::burn::init(&burn::backend::wgpu::WgpuDevice::default()).unwrap_err();
    assert!(e.to_string().contains("before the device's first tensor"), "{e}");
}
