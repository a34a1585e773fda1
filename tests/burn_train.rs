//! `xent::burn::train` on burn's autodiff wgpu backend: the loss and the gradient that
//! `loss.backward()` produces, against the f64 reference (`xent::train::reference`) and against the
//! same loss composed of burn's own differentiable ops.
//!
//! Every device here is registered through `xent::burn::register`, on its own wgpu device.

mod common;

use std::sync::OnceLock;

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorCreationOptions, TensorData};
use common::{close, random_case};
use xent::train::{reference, LossOptions, LossReduction, Upstream};
use xent::{Dtype, Error, Logits, Targets};

/// A plain burn wgpu device xent was set up on, or `None` (a loud skip; a failure under
/// `XENT_REQUIRE_GPU=1`) without an adapter. Tests call `.autodiff()` on it.
fn device() -> Option<&'static Device> {
    static DEVICE: OnceLock<Option<Device>> = OnceLock::new();
    DEVICE
        .get_or_init(|| match xent::burn::setup_of_default_adapter() {
            Ok(setup) => Some(xent::burn::register(setup).expect("register a fresh setup")),
            Err(e) => {
                if std::env::var("XENT_REQUIRE_GPU").as_deref() == Ok("1") {
                    panic!("XENT_REQUIRE_GPU=1 but no GPU adapter: {e}");
                }
                eprintln!("\n!!!!! SKIPPING BURN TRAINING TEST: no GPU adapter ({e}) !!!!!\n");
                None
            }
        })
        .as_ref()
}

/// Logits of `dtype` holding `values` rounded to `dtype`, and the rounded values' bytes.
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
    (tensor, bytes)
}

fn targets_tensor<const E: usize>(targets: &[i64], shape: [usize; E], device: &Device) -> Tensor<E, Int> {
    let t: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
    Tensor::<E, Int>::from_data(
        TensorData::new(t, shape),
        TensorCreationOptions::new(device.clone()).with_dtype(DType::I32),
    )
}

/// A float tensor's values on the host (converted there: burn cannot compute in bf16 everywhere).
fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    let data = t.into_data();
    match data.dtype() {
        DType::F16 => data.as_slice::<half::f16>().expect("f16 data").iter().map(|v| v.to_f32()).collect(),
        DType::BF16 => data.as_slice::<half::bf16>().expect("bf16 data").iter().map(|v| v.to_f32()).collect(),
        _ => data.try_to_vec::<f32>().expect("f32 data"),
    }
}

/// Compares a gradient with the reference's: `|got − want| <= atol + rtol·|want|`, with `atol`
/// relative to the gradient's largest value (its scale is `1 / N` under `mean`).
fn check_grad(got: &[f32], want: &[f64], atol: f64, rtol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("gradient has {} values, want {}", got.len(), want.len()));
    }
    let top = want.iter().fold(0f64, |m, w| if w.is_finite() { m.max(w.abs()) } else { m });
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !close(f64::from(*g), *w, atol * top.max(1e-30), rtol) {
            return Err(format!("gradient[{i}] got {g} want {w} (largest |grad| {top:e})"));
        }
    }
    Ok(())
}

/// The loss as burn composes it from its own differentiable ops, for the same options.
fn burn_loss(logits: Tensor<2>, targets: &[i64], opts: &LossOptions<'_>, device: &Device) -> Tensor<1> {
    let [n, v] = logits.dims();
    let x = logits.cast(DType::F32);
    let z = match opts.softcap {
        Some(cap) => x.div_scalar(cap).tanh().mul_scalar(cap),
        None => x,
    };
    let m = z.clone().detach().max_dim(1);
    let lse = z.clone().sub(m.clone()).exp().sum_dim(1).log().add(m);
    let keep: Vec<bool> = targets.iter().map(|&t| t != opts.ignore_index).collect();
    let safe: Vec<i64> = targets.iter().map(|&t| if t == opts.ignore_index { 0 } else { t }).collect();
    let plain = device.clone();
    let w = opts.weight.map(|w| Tensor::<1>::from_data(TensorData::new(w.to_vec(), [v]), &plain));
    let w_t: Vec<f32> = safe.iter().map(|&t| opts.weight.map_or(1.0, |w| w[t as usize])).collect();
    let w_sum: f64 = w_t.iter().zip(&keep).filter(|(_, k)| **k).map(|(w, _)| f64::from(*w)).sum();
    let w_total: f64 = opts.weight.map_or(v as f64, |w| w.iter().map(|&x| f64::from(x)).sum());
    let idx = Tensor::<2, Int>::from_data(TensorData::new(safe, [n, 1]), &plain);
    let w_t = Tensor::<1>::from_data(TensorData::new(w_t, [n]), &plain);
    let keep = Tensor::<1, Bool>::from_data(TensorData::new(keep, [n]), &plain);
    let eps = f64::from(opts.label_smoothing);
    let nll = lse.clone().sub(z.clone().gather(1, idx)).reshape([n]).mul(w_t).mul_scalar(1.0 - eps);
    let wz = match w {
        Some(w) => z.mul(w.reshape([1, v])).sum_dim(1),
        None => z.sum_dim(1),
    };
    let smooth = lse.clone().mul_scalar(w_total).sub(wz).reshape([n]).mul_scalar(eps / v as f64);
    let zl = lse.square().reshape([n]).mul_scalar(f64::from(opts.z_loss));
    let row = nll.add(smooth).add(zl).mask_fill(keep.bool_not(), 0.0);
    match opts.reduction {
        LossReduction::None => row,
        LossReduction::Sum => row.sum(),
        LossReduction::Mean => row.sum().div_scalar(w_sum),
    }
}

/// One case: xent's loss and `backward()` gradient against the reference and burn's composition.
struct Case<'a> {
    rows: usize,
    vocab: usize,
    seed: u64,
    scale: f32,
    dtype: Dtype,
    opts: LossOptions<'a>,
    /// Rows whose target is replaced by the ignore index.
    ignore: &'a [usize],
    /// `[B, T, V]` instead of `[N, V]` (B = 2).
    rank3: bool,
    /// Per-row upstream gradients (reduction `none`): the loss is `Σ loss_r · up_r`.
    per_row: Option<Vec<f32>>,
    /// Also compare with burn's own composed loss (f32 only).
    against_burn: bool,
    /// Pass the loss `logits · 1`, a temporary nothing holds at the backward (xent writes the
    /// gradient in place), instead of the leaf itself (held: a new tensor).
    via_op: bool,
}

impl Case<'_> {
    fn run(&self, device: &Device) -> Result<(), String> {
        let ad = device.clone().autodiff();
        let (n, v) = (self.rows, self.vocab);
        let (x, mut t) = random_case(n, v, self.seed, self.scale);
        for &r in self.ignore {
            t[r] = self.opts.ignore_index;
        }
        let (logits, bytes) = logits_tensor(&x, [n, v], self.dtype, &ad);
        let logits = logits.require_grad();
        // Moved into the call below: nothing but the caller's leaf (when not via an op) holds
        // the logits at the backward.
        let input = if self.via_op { logits.clone().mul_scalar(1.0) } else { logits.clone() };
        let before = xent::burn::train::backward_stats();
        let loss = if self.rank3 {
            let x3 = input.reshape([2, n / 2, v]);
            let t3 = targets_tensor(&t, [2, n / 2], &ad);
            xent::burn::train::cross_entropy(&x3, &t3, &self.opts)
        } else {
            let input = input;
            xent::burn::train::cross_entropy(&input, &targets_tensor(&t, [n], &ad), &self.opts)
        }
        .map_err(|e| e.to_string())?;
        let want_len = if self.opts.reduction == LossReduction::None { n } else { 1 };
        if loss.dims() != [want_len] {
            return Err(format!("loss has shape {:?}, want [{want_len}]", loss.dims()));
        }
        let root = match &self.per_row {
            Some(up) => loss.clone().mul(Tensor::<1>::from_data(TensorData::new(up.clone(), [n]), &ad)).sum(),
            None => loss.clone(),
        };
        let grads = root.backward();
        if self.via_op && xent::burn::train::backward_stats().in_place == before.in_place {
            return Err("the gradient of a temporary was not written in place".into());
        }
        let got_loss = floats(loss.inner());
        let got_grad = floats(logits.grad(&grads).ok_or("no gradient for the logits")?);

        let host = Logits::from_bytes(&bytes, self.dtype, n, v).map_err(|e| e.to_string())?;
        let up = match &self.per_row {
            Some(up) => Upstream::PerRow(up),
            None => Upstream::Scalar(1.0),
        };
        let want = reference::cross_entropy(host, Targets::I64(&t), &self.opts, up).map_err(|e| e.to_string())?;
        let (ltol, gtol) = match self.dtype {
            Dtype::F32 => ((1e-5, 1e-5), (2e-6, 1e-4)),
            // Read from f16/bf16, computed in f32, the gradient rounded to the logits' dtype.
            Dtype::F16 => ((1e-5, 1e-5), (2e-3, 2e-3)),
            Dtype::BF16 => ((1e-5, 1e-5), (1e-2, 1e-2)),
        };
        let want_loss: Vec<f64> =
            if self.opts.reduction == LossReduction::None { want.row_loss.clone() } else { vec![want.loss] };
        for (i, (g, w)) in got_loss.iter().zip(&want_loss).enumerate() {
            if !close(f64::from(*g), *w, ltol.0, ltol.1) {
                return Err(format!("loss[{i}] got {g} want {w}"));
            }
        }
        check_grad(&got_grad, &want.grad, gtol.0, gtol.1).map_err(|e| format!("against the reference: {e}"))?;

        if self.against_burn {
            let (logits, _) = logits_tensor(&x, [n, v], self.dtype, &ad);
            let logits = logits.require_grad();
            let loss = burn_loss(logits.clone(), &t, &self.opts, device);
            let root = match &self.per_row {
                Some(up) => loss.mul(Tensor::<1>::from_data(TensorData::new(up.clone(), [n]), &ad)).sum(),
                None => loss,
            };
            let grads = root.backward();
            let burn_grad = floats(logits.grad(&grads).ok_or("no gradient from burn's loss")?);
            let burn_grad: Vec<f64> = burn_grad.iter().map(|&g| f64::from(g)).collect();
            check_grad(&got_grad, &burn_grad, 1e-5, 1e-3).map_err(|e| format!("against burn's own loss: {e}"))?;
        }
        Ok(())
    }
}

fn case(rows: usize, vocab: usize, opts: LossOptions<'_>) -> Case<'_> {
    Case {
        rows,
        vocab,
        seed: (rows * 7919 + vocab) as u64,
        scale: 2.0,
        dtype: Dtype::F32,
        opts,
        ignore: &[],
        rank3: false,
        per_row: None,
        against_burn: true,
        via_op: false,
    }
}

#[test]
fn gradient_matches_the_reference_and_burn_over_shapes() {
    let Some(device) = device() else { return };
    for (rows, vocab) in [(1, 1), (1, 5), (3, 7), (6, 31), (17, 1000), (4, 32000), (2, 50257)] {
        case(rows, vocab, LossOptions::default()).run(device).unwrap_or_else(|e| panic!("[{rows}, {vocab}]: {e}"));
    }
    for via_op in [false, true] {
        let c = Case { rank3: true, via_op, ignore: &[1, 4], ..case(6, 300, LossOptions::default()) };
        c.run(device).unwrap_or_else(|e| panic!("[2, 3, 300] (in place: {via_op}): {e}"));
    }
    eprintln!("backward paths so far: {:?}", xent::burn::train::backward_stats());
}

#[test]
fn every_reduction_and_option() {
    let Some(device) = device() else { return };
    let (rows, vocab) = (13, 517);
    let weight: Vec<f32> = (0..vocab).map(|j| 0.25 + (j % 7) as f32 * 0.3).collect();
    let up: Vec<f32> = (0..rows).map(|r| (r as f32 - 6.0) / 3.0).collect();
    let reductions = [LossReduction::Mean, LossReduction::Sum, LossReduction::None];
    for reduction in reductions {
        let base = LossOptions { reduction, ..LossOptions::default() };
        let variants: Vec<(&str, LossOptions<'_>)> = vec![
            ("plain", base),
            ("ignore_index 3", LossOptions { ignore_index: 3, ..base }),
            ("weight", LossOptions { weight: Some(&weight), ..base }),
            ("label_smoothing", LossOptions { label_smoothing: 0.1, ..base }),
            ("z_loss", LossOptions { z_loss: 1e-3, ..base }),
            ("softcap", LossOptions { softcap: Some(5.0), ..base }),
            (
                "all together",
                LossOptions {
                    ignore_index: -1,
                    weight: Some(&weight),
                    label_smoothing: 0.2,
                    z_loss: 1e-2,
                    softcap: Some(3.0),
                    ..base
                },
            ),
        ];
        for (name, opts) in variants {
            for via_op in [false, true] {
                let c = Case { ignore: &[0, 5, 6], via_op, ..case(rows, vocab, opts) };
                c.run(device).unwrap_or_else(|e| panic!("{reduction:?} {name} (in place: {via_op}): {e}"));
            }
            if reduction == LossReduction::None {
                let c = Case { ignore: &[2], per_row: Some(up.clone()), ..case(rows, vocab, opts) };
                c.run(device).unwrap_or_else(|e| panic!("{reduction:?} {name}, per-row upstream: {e}"));
            }
        }
    }
}

#[test]
fn half_precision_logits() {
    let Some(device) = device() else { return };
    // burn holds bf16 tensors even where it cannot compute in bf16 (lavapipe): xent reads them
    // and writes their gradient without a burn op in that dtype.
    for dtype in [Dtype::F16, Dtype::BF16] {
        let opts = LossOptions { label_smoothing: 0.1, ..LossOptions::default() };
        let c = Case { dtype, against_burn: false, ignore: &[1], ..case(9, 3000, opts) };
        c.run(device).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        // In place needs an op in that dtype to make the logits a temporary.
        let burn_dtype = if dtype == Dtype::F16 { DType::F16 } else { DType::BF16 };
        if device.supports_dtype(burn_dtype) {
            let c = Case { dtype, against_burn: false, via_op: true, ignore: &[1], ..case(9, 3001, opts) };
            c.run(device).unwrap_or_else(|e| panic!("{dtype:?} in place: {e}"));
        } else {
            eprintln!("burn cannot compute in {dtype:?} on this adapter: in place not checked");
        }
    }
}

#[test]
fn every_row_ignored() {
    let Some(device) = device() else { return };
    let ad = device.clone().autodiff();
    let (rows, vocab) = (4, 50);
    let (x, _) = random_case(rows, vocab, 1, 1.0);
    for reduction in [LossReduction::Mean, LossReduction::Sum, LossReduction::None] {
        let (logits, _) = logits_tensor(&x, [rows, vocab], Dtype::F32, &ad);
        let logits = logits.require_grad();
        let opts = LossOptions { reduction, ..LossOptions::default() };
        let loss = xent::burn::train::cross_entropy(&logits, &targets_tensor(&[-100; 4], [rows], &ad), &opts).unwrap();
        let grads = loss.clone().sum().backward();
        let loss = floats(loss.inner());
        match reduction {
            // torch: 0 / 0.
            LossReduction::Mean => assert!(loss[0].is_nan(), "mean of nothing: {loss:?}"),
            _ => assert!(loss.iter().all(|&l| l == 0.0), "{reduction:?}: {loss:?}"),
        }
        let grad = floats(logits.grad(&grads).unwrap());
        assert!(grad.iter().all(|&g| g == 0.0), "{reduction:?}: a gradient of an ignored row is not 0");
    }
}

#[test]
fn trains_a_linear_layer_like_burns_loss() {
    // The gradient reaches the parameters before the logits: a linear layer's weight.
    let Some(device) = device() else { return };
    // burn's two checkpointing strategies: none, and balanced (recomputes memory-bound ops).
    for ad in [device.clone().autodiff(), device.clone().autodiff().gradient_checkpointing()] {
        linear_layer_case(device, &ad);
    }
}

fn linear_layer_case(device: &Device, ad: &Device) {
    let ad = ad.clone();
    let (rows, d, vocab) = (24, 16, 700);
    let (w, t) = random_case(d, vocab, 3, 0.3);
    let (h, _) = random_case(rows, d, 4, 1.0);
    let mut t: Vec<i64> = t.iter().cycle().take(rows).map(|&x| x % vocab as i64).collect();
    t[3] = -100;
    let opts = LossOptions { label_smoothing: 0.05, z_loss: 1e-4, ..LossOptions::default() };
    let grad_of = |use_xent: bool| {
        let weight = Tensor::<2>::from_data(TensorData::new(w.clone(), [d, vocab]), &ad).require_grad();
        let hidden = Tensor::<2>::from_data(TensorData::new(h.clone(), [rows, d]), &ad);
        let logits = hidden.matmul(weight.clone());
        let loss = if use_xent {
            xent::burn::train::cross_entropy(&logits, &targets_tensor(&t, [rows], &ad), &opts).unwrap()
        } else {
            burn_loss(logits, &t, &opts, device)
        };
        let grads = loss.backward();
        (floats(loss.inner())[0], floats(weight.grad(&grads).unwrap()))
    };
    let (xl, xg) = grad_of(true);
    let (bl, bg) = grad_of(false);
    let strategy = ad.gradient_checkpointing_strategy();
    assert!(close(f64::from(xl), f64::from(bl), 1e-5, 1e-5), "{strategy:?} loss: xent {xl}, burn {bl}");
    let bg: Vec<f64> = bg.iter().map(|&g| f64::from(g)).collect();
    check_grad(&xg, &bg, 1e-5, 1e-3).unwrap_or_else(|e| panic!("{strategy:?} weight gradient: {e}"));
}

#[test]
fn without_autodiff_it_is_the_forward_only() {
    let Some(device) = device() else { return };
    let (rows, vocab) = (5, 40);
    let (x, t) = random_case(rows, vocab, 9, 1.0);
    let (logits, _) = logits_tensor(&x, [rows, vocab], Dtype::F32, device);
    let opts = LossOptions { reduction: LossReduction::Sum, ..LossOptions::default() };
    let loss = xent::burn::train::cross_entropy(&logits, &targets_tensor(&t, [rows], device), &opts).unwrap();
    assert!(!loss.is_autodiff());
    let want =
        reference::cross_entropy(Logits::f32(&x, vocab).unwrap(), Targets::I64(&t), &opts, Upstream::Scalar(1.0))
            .unwrap();
    let got = floats(loss)[0];
    assert!(close(f64::from(got), want.loss, 1e-5, 1e-5), "{got} vs {}", want.loss);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let Some(device) = device() else { return };
    let ad = device.clone().autodiff();
    let (rows, vocab) = (4, 10);
    let (x, t) = random_case(rows, vocab, 1, 1.0);
    let (logits, _) = logits_tensor(&x, [rows, vocab], Dtype::F32, &ad);
    let targets = targets_tensor(&t, [rows], &ad);
    let ce = |opts: &LossOptions<'_>| xent::burn::train::cross_entropy(&logits, &targets, opts).unwrap_err();

    let e = ce(&LossOptions { label_smoothing: 1.5, ..LossOptions::default() });
    assert!(matches!(e, Error::Argument(_)) && e.to_string().contains("label_smoothing"), "{e}");
    let e = ce(&LossOptions { z_loss: -1.0, ..LossOptions::default() });
    assert!(matches!(e, Error::Argument(_)) && e.to_string().contains("z_loss"), "{e}");
    let e = ce(&LossOptions { softcap: Some(0.0), ..LossOptions::default() });
    assert!(matches!(e, Error::Argument(_)) && e.to_string().contains("softcap"), "{e}");
    let short = [1.0f32; 3];
    let e = ce(&LossOptions { weight: Some(&short), ..LossOptions::default() });
    assert!(matches!(e, Error::Shape(_)) && e.to_string().contains("weight"), "{e}");

    let e = xent::burn::train::cross_entropy(&logits, &targets_tensor(&t[..3], [3], &ad), &LossOptions::default())
        .unwrap_err();
    assert!(matches!(e, Error::Shape(_)) && e.to_string().contains("disagree"), "{e}");

    // A target out of range: NaN, not an error (it would take a read back to report).
    let bad = targets_tensor(&[1, 2, 10, 3], [4], &ad);
    let none = LossOptions { reduction: LossReduction::None, ..LossOptions::default() };
    let loss = floats(xent::burn::train::cross_entropy(&logits, &bad, &none).unwrap().inner());
    assert!(loss[2].is_nan() && loss[0].is_finite(), "{loss:?}");

    // An empty batch: torch's values, and an empty gradient.
    for (reduction, want) in
        [(LossReduction::Mean, Some(f32::NAN)), (LossReduction::Sum, Some(0.0)), (LossReduction::None, None)]
    {
        let empty = Tensor::<2>::zeros([0, vocab], &ad).require_grad();
        let opts = LossOptions { reduction, ..LossOptions::default() };
        let loss = xent::burn::train::cross_entropy(&empty, &targets_tensor(&[], [0], &ad), &opts).unwrap();
        let got = floats(loss.clone().inner());
        match want {
            Some(w) => {
                assert!(got.len() == 1 && (got[0] == w || (w.is_nan() && got[0].is_nan())), "{reduction:?}: {got:?}")
            }
            None => assert!(got.is_empty(), "{got:?}"),
        }
        let grads = loss.sum().backward();
        assert_eq!(empty.grad(&grads).map(|g| g.dims()), Some([0, vocab]), "{reduction:?}");
    }

    // A device xent was not set up on.
    let foreign = Device::default().autodiff();
    let (logits, _) = logits_tensor(&x, [rows, vocab], Dtype::F32, &foreign);
    let e = xent::burn::train::cross_entropy(&logits, &targets_tensor(&t, [rows], &foreign), &LossOptions::default())
        .unwrap_err();
    assert!(matches!(e, Error::Engine(_)) && e.to_string().contains("not set up through xent"), "{e}");
}

#[test]
fn in_place_when_nothing_else_holds_the_logits() {
    // Logits made by an op and dropped before the backward: xent writes the gradient over them.
    // Held by the caller (or by a view: the [B, T, V] tensor xent flattens): a new tensor.
    let Some(device) = device() else { return };
    let ad = device.clone().autodiff();
    let (rows, d, vocab) = (16, 8, 999);
    let (w, _) = random_case(d, vocab, 5, 0.5);
    let (h, t) = random_case(rows, d, 6, 1.0);
    let t: Vec<i64> = t.iter().map(|&x| x * 37 % vocab as i64).collect();
    let opts = LossOptions { z_loss: 1e-3, softcap: Some(8.0), ..LossOptions::default() };
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Hold {
        Nothing,
        Logits,
        Rank3Dropped,
        Rank3Held,
    }
    let grad_of = |hold: Hold, use_xent: bool| {
        let weight = Tensor::<2>::from_data(TensorData::new(w.clone(), [d, vocab]), &ad).require_grad();
        let hidden = Tensor::<2>::from_data(TensorData::new(h.clone(), [rows, d]), &ad);
        let targets = targets_tensor(&t, [rows], &ad);
        let loss = match (hold, use_xent) {
            (_, false) => burn_loss(hidden.matmul(weight.clone()), &t, &opts, device),
            (Hold::Nothing, true) => {
                xent::burn::train::cross_entropy(&hidden.matmul(weight.clone()), &targets, &opts).unwrap()
            }
            (Hold::Logits, true) => {
                let logits = hidden.matmul(weight.clone());
                let loss = xent::burn::train::cross_entropy(&logits, &targets, &opts).unwrap();
                let grads = loss.backward();
                drop(logits);
                return floats(weight.grad(&grads).unwrap());
            }
            (Hold::Rank3Dropped | Hold::Rank3Held, true) => {
                let logits = hidden.matmul(weight.clone()).reshape([2, rows / 2, vocab]);
                let loss = xent::burn::train::cross_entropy(&logits, &targets.reshape([2, rows / 2]), &opts).unwrap();
                if hold == Hold::Rank3Held {
                    let grads = loss.backward();
                    drop(logits);
                    return floats(weight.grad(&grads).unwrap());
                }
                loss
            }
        };
        floats(weight.grad(&loss.backward()).unwrap())
    };
    let want: Vec<f64> = grad_of(Hold::Nothing, false).iter().map(|&g| f64::from(g)).collect();
    for (hold, in_place) in
        [(Hold::Nothing, true), (Hold::Logits, false), (Hold::Rank3Dropped, true), (Hold::Rank3Held, false)]
    {
        let before = xent::burn::train::backward_stats();
        let got = grad_of(hold, true);
        let after = xent::burn::train::backward_stats();
        check_grad(&got, &want, 1e-5, 1e-3).unwrap_or_else(|e| panic!("{hold:?}: {e}"));
        if in_place {
            assert!(after.in_place > before.in_place, "{hold:?}: the gradient was not written in place: {after:?}");
        } else {
            assert!(
                after.separate + after.staged > before.separate + before.staged,
                "{hold:?}: the gradient should have gone to a new tensor: {after:?}"
            );
        }
    }
}

#[test]
fn large_logits_held_by_the_caller() {
    // The gradient goes to a new tensor, which burn places in a buffer of its own or in the
    // logits' buffer: checked against burn's own loss either way.
    let Some(device) = device() else { return };
    let before = xent::burn::train::backward_stats();
    let opts = LossOptions { label_smoothing: 0.05, ..LossOptions::default() };
    let c = Case { scale: 4.0, ignore: &[3], ..case(40, 50257, opts) };
    c.run(device).unwrap_or_else(|e| panic!("[40, 50257]: {e}"));
    let after = xent::burn::train::backward_stats();
    eprintln!("backward paths: {before:?} -> {after:?}");
    // f32 gradients are never staged: in the logits' own buffer they are written directly.
    assert!(after.separate > before.separate && after.staged == before.staged, "{after:?}");
}
