//! `xent::candle::train`: the differentiable loss on candle's CPU tensors. Its forward and
//! backward give exactly the values of xent's CPU path (checked against the f64 reference in
//! `train_cpu.rs`) for every dtype, reduction and option; the gradient reaches parameters
//! through candle's graph as candle's own composed loss sends it; bad inputs are xent's errors.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::{close, random_case};
use xent::candle::train::cross_entropy;
use xent::train::{cpu, LossOptions, LossReduction, Upstream};
use xent::{Dtype, Error, Logits, Targets};

const CPU: Device = Device::Cpu;

/// A candle tensor of `dims` holding `x` as `dtype` (16-bit values rounded to nearest), and
/// the bytes xent reads of it.
fn logits_tensor(x: &[f32], dims: &[usize], dtype: Dtype) -> (Tensor, Vec<u8>) {
    let t = match dtype {
        Dtype::F32 => Tensor::from_vec(x.to_vec(), dims, &CPU),
        Dtype::F16 => Tensor::from_vec(x.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>(), dims, &CPU),
        Dtype::BF16 => Tensor::from_vec(x.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>(), dims, &CPU),
    }
    .expect("tensor");
    (t, dtype.encode(x))
}

/// The bytes of a candle f32/f16/bf16 tensor, row-major.
fn bytes_of(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

#[test]
fn forward_and_backward_are_the_cpu_paths_values() {
    let w = {
        let mut rng = xent::synth::Rng::new(3);
        (0..1000).map(|_| 0.25 + 2.0 * rng.uniform() as f32).collect::<Vec<_>>()
    };
    for (dims, vocab) in [(vec![1usize, 1], 1usize), (vec![5, 300], 300), (vec![3, 4, 1000], 1000)] {
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let (x, mut t) = random_case(rows, vocab, (rows * vocab) as u64, 3.0);
        if rows > 2 {
            t[1] = -100;
        }
        let up: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32).collect();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            for reduction in [LossReduction::Mean, LossReduction::Sum, LossReduction::None] {
                let plain = LossOptions { reduction, ..LossOptions::default() };
                let every = LossOptions {
                    reduction,
                    weight: Some(&w[..vocab]),
                    label_smoothing: 0.1,
                    z_loss: 1e-3,
                    softcap: Some(8.0),
                    ..LossOptions::default()
                };
                for opts in [plain, every] {
                    let what = format!("{dims:?} {dtype} {reduction:?} with options: {}", opts.weight.is_some());
                    let (tensor, bytes) = logits_tensor(&x, &dims, dtype);
                    let var = Var::from_tensor(&tensor).unwrap();
                    let targets = Tensor::from_vec(t.clone(), &dims[..dims.len() - 1], &CPU).unwrap();
                    let loss = cross_entropy(var.as_tensor(), &targets, &opts).unwrap();
                    // Upstream: per row for `none` (a weighted sum), 2.5 for a reduced loss.
                    let (total, upstream) = match reduction {
                        LossReduction::None => {
                            assert_eq!(loss.dims(), targets.dims(), "{what}");
                            let u = Tensor::from_vec(up.clone(), targets.dims(), &CPU).unwrap();
                            ((&loss * &u).unwrap().sum_all().unwrap(), Upstream::PerRow(&up))
                        }
                        _ => {
                            assert_eq!(loss.rank(), 0, "{what}");
                            ((&loss * 2.5).unwrap(), Upstream::Scalar(2.5))
                        }
                    };
                    let grads = total.backward().unwrap();
                    let grad = grads.get(var.as_tensor()).expect("a gradient for the logits");
                    assert_eq!((grad.dims(), grad.dtype()), (tensor.dims(), tensor.dtype()), "{what}");

                    let view = Logits::from_bytes(&bytes, dtype, rows, vocab).unwrap();
                    let mut want_grad = vec![0u8; bytes.len()];
                    let want =
                        cpu::loss_and_grad(view, Targets::I64(&t), &opts, upstream, Some(&mut want_grad)).unwrap();
                    // The same values; a -0 may come back +0, as candle's backward adds each
                    // gradient to a zero tensor.
                    let got_bytes = bytes_of(grad);
                    let (got_grad, want_grad) = (
                        Logits::from_bytes(&got_bytes, dtype, rows, vocab).unwrap(),
                        Logits::from_bytes(&want_grad, dtype, rows, vocab).unwrap(),
                    );
                    for i in 0..rows * vocab {
                        let (a, b) = (got_grad.get(i / vocab, i % vocab), want_grad.get(i / vocab, i % vocab));
                        assert!(a == b || (a.is_nan() && b.is_nan()), "{what}: grad[{i}] {a:e}, the CPU path's {b:e}");
                    }
                    let got: Vec<f32> = loss.flatten_all().unwrap().to_vec1().unwrap();
                    let expect: Vec<f32> = match reduction {
                        LossReduction::None => want.rows.iter().map(|r| r.loss).collect(),
                        _ => vec![want.loss as f32],
                    };
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&expect), "{what}: the loss");
                }
            }
        }
    }
}

/// The mean cross-entropy as candle composes it from its own ops (candle-nn's recipe):
/// `lse - gather(x, t)`, averaged over the rows.
fn composed_loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let max = logits.max_keepdim(D::Minus1).unwrap().detach();
    let shifted = logits.broadcast_sub(&max).unwrap();
    let lse = shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap().broadcast_add(&max).unwrap();
    let picked = logits.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
    (lse - picked).unwrap().mean_all().unwrap()
}

/// A linear layer's weight gets the same gradient through xent's loss as through candle's own:
/// the op sits inside the graph (logits computed from a `Var`, not a leaf) and passes the
/// upstream gradient on as candle's autograd does.
#[test]
fn gradient_flows_to_parameters_as_candles_own_loss() {
    let (rows, hidden, vocab) = (16, 24, 1000);
    let mut rng = xent::synth::Rng::new(11);
    let h: Vec<f32> = (0..rows * hidden).map(|_| rng.normal() as f32).collect();
    let w0: Vec<f32> = (0..hidden * vocab).map(|_| 0.3 * rng.normal() as f32).collect();
    let t: Vec<i64> = (0..rows).map(|_| rng.below(vocab) as i64).collect();
    let h = Tensor::from_vec(h, (rows, hidden), &CPU).unwrap();
    let targets = Tensor::from_vec(t, rows, &CPU).unwrap();
    let grad_of = |use_xent: bool| {
        let w = Var::from_vec(w0.clone(), (hidden, vocab), &CPU).unwrap();
        let logits = h.matmul(w.as_tensor()).unwrap();
        let loss = if use_xent {
            cross_entropy(&logits, &targets, &LossOptions::default()).unwrap()
        } else {
            composed_loss(&logits, &targets)
        };
        let value = loss.to_scalar::<f32>().unwrap();
        let g = loss.backward().unwrap().get(w.as_tensor()).expect("a gradient for w").flatten_all().unwrap();
        (value, g.to_vec1::<f32>().unwrap())
    };
    let (ours, g_ours) = grad_of(true);
    let (theirs, g_theirs) = grad_of(false);
    assert!(close(f64::from(ours), f64::from(theirs), 1e-5, 1e-5), "loss {ours} vs candle's {theirs}");
    let scale = g_theirs.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (i, (a, b)) in g_ours.iter().zip(&g_theirs).enumerate() {
        assert!((a - b).abs() <= 1e-5 * scale, "dL/dw[{i}]: {a} vs candle's {b} (largest {scale})");
    }
}

#[test]
fn bad_inputs_are_xents_errors() {
    let x = Tensor::from_vec((0..24).map(|v| v as f32).collect::<Vec<_>>(), (4, 6), &CPU).unwrap();
    let t = Tensor::new(&[0i64, 1, 2, 3], &CPU).unwrap();
    let d = LossOptions::default();
    assert!(cross_entropy(&x, &t, &d).is_ok());
    let transposed = x.t().unwrap();
    let t6 = Tensor::new(&[0i64, 1, 2, 3, 0, 1], &CPU).unwrap();
    assert!(matches!(cross_entropy(&transposed, &t6, &d), Err(Error::Engine(m)) if m.contains("contiguous")));
    assert!(matches!(cross_entropy(&x, &t6, &d), Err(Error::Shape(_))));
    let out_of_range = Tensor::new(&[0i64, 6, 2, 3], &CPU).unwrap();
    assert!(matches!(cross_entropy(&x, &out_of_range, &d), Err(Error::TargetOutOfRange { row: 1, .. })));
    let floats = Tensor::new(&[0f32, 1., 2., 3.], &CPU).unwrap();
    assert!(matches!(cross_entropy(&x, &floats, &d), Err(Error::Dtype { .. })));
    let ints = x.to_dtype(DType::U32).unwrap();
    assert!(matches!(cross_entropy(&ints, &t, &d), Err(Error::Dtype { .. })));
    let smoothing = LossOptions { label_smoothing: 2.0, ..d };
    assert!(matches!(cross_entropy(&x, &t, &smoothing), Err(Error::Argument(_))));
    let short = [1.0f32; 5];
    let weight = LossOptions { weight: Some(&short), ..d };
    assert!(matches!(cross_entropy(&x, &t, &weight), Err(Error::Shape(_))));
}
