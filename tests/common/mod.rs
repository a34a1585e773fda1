//! Shared test helpers: the GPU (or a loud skip), generators, and the tolerance check.
#![allow(dead_code)]

use std::sync::OnceLock;

use xent::reference::RefRow;
use xent::{Dtype, GpuContext, Plan, Reduction, RowLoss};

/// Absolute tolerance for f32 logits.
pub const ATOL: f64 = 1e-6;
/// Relative tolerance for f32 logits.
pub const RTOL: f64 = 2e-6;

/// A fresh GPU context, or `None` with a loud message; a hard failure under `XENT_REQUIRE_GPU=1`.
pub fn new_gpu() -> Option<GpuContext> {
    match GpuContext::new() {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            if std::env::var("XENT_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("XENT_REQUIRE_GPU=1 but no GPU adapter: {e}");
            }
            eprintln!("\n!!!!! SKIPPING GPU TEST: no GPU adapter ({e}). Install mesa-vulkan-drivers. !!!!!\n");
            None
        }
    }
}

/// One GPU context shared by the tests of a binary.
pub fn gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(new_gpu).as_ref()
}

/// Whether `got` is within `atol + rtol * |want|` of `want`; NaN matches NaN, inf matches the same inf.
pub fn close(got: f64, want: f64, atol: f64, rtol: f64) -> bool {
    if want.is_nan() || got.is_nan() {
        return want.is_nan() && got.is_nan();
    }
    if want.is_infinite() || got.is_infinite() {
        return got == want;
    }
    (got - want).abs() <= atol + rtol * want.abs()
}

/// Checks every row against the reference: nll, lse, ignored and correct flags.
/// Returns the worst absolute nll error seen.
pub fn check_rows(got: &[RowLoss], want: &[RefRow], atol: f64, rtol: f64) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!("got {} rows, want {}", got.len(), want.len()));
    }
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (gn, gl) = (f64::from(g.nll), f64::from(g.lse));
        if !close(gn, w.nll, atol, rtol) {
            return Err(format!("row {i}: nll got {gn} want {} (flags {:#x})", w.nll, g.flags));
        }
        if !w.ignored && !close(gl, w.lse, atol, rtol) {
            return Err(format!("row {i}: lse got {gl} want {}", w.lse));
        }
        if g.argmax != w.argmax.map_or(u32::MAX, |a| a as u32) {
            return Err(format!("row {i}: argmax got {} want {:?}", g.argmax, w.argmax));
        }
        if g.ignored() != w.ignored || g.correct() != w.correct {
            return Err(format!(
                "row {i}: flags {:#x} (argmax {}) but reference ignored={} correct={} argmax={:?}",
                g.flags, g.argmax, w.ignored, w.correct, w.argmax
            ));
        }
        if gn.is_finite() && w.nll.is_finite() {
            worst = worst.max((gn - w.nll).abs());
        }
    }
    Ok(worst)
}

/// f32 values as bytes of `dtype`.
pub fn to_bytes(x: &[f32], dtype: Dtype) -> Vec<u8> {
    dtype.encode(x)
}

/// Random logits with a given spread and targets in range, deterministic per seed.
pub fn random_case(rows: usize, vocab: usize, seed: u64, scale: f32) -> (Vec<f32>, Vec<i64>) {
    let mut rng = xent::synth::Rng::new(seed);
    let x = (0..rows * vocab).map(|_| (rng.normal() as f32) * scale).collect();
    let t = (0..rows).map(|_| rng.below(vocab) as i64).collect();
    (x, t)
}

/// Every kernel layout worth testing: the planner's own choice, then each reduction with one
/// row per workgroup, several rows per workgroup, and rows split over several workgroups.
pub fn all_plans() -> Vec<Option<Plan>> {
    let p = |reduction, rows_per_workgroup, split| Some(Plan { reduction, rows_per_workgroup, split });
    vec![
        None,
        p(Reduction::Workgroup, 1, 1),
        p(Reduction::Subgroup, 1, 1),
        p(Reduction::Workgroup, 8, 1),
        p(Reduction::Workgroup, 64, 1),
        p(Reduction::Workgroup, 1, 3),
        p(Reduction::Subgroup, 1, 5),
        p(Reduction::Workgroup, 1, 64),
        p(Reduction::Subgroup, 1, 256),
    ]
}

/// One GPU context per entry of [`all_plans`], each forced to its plan.
pub fn planned_gpus() -> &'static [(Option<Plan>, GpuContext)] {
    static CTXS: OnceLock<Vec<(Option<Plan>, GpuContext)>> = OnceLock::new();
    CTXS.get_or_init(|| {
        all_plans()
            .into_iter()
            .filter_map(|plan| {
                let mut ctx = new_gpu()?;
                ctx.force_plan(plan);
                Some((plan, ctx))
            })
            .collect()
    })
}

/// Checks KLD rows against the f64 reference: `kld` within `katol + krtol·kld`, `nll_base`,
/// `nll_test` and `dp` within `atol + rtol·|ref|`, argmaxes and the ignored / same-top /
/// has-target flags equal. Returns the worst KLD error as a fraction of its tolerance.
pub fn check_kld(
    got: &[xent::kld::KldRow],
    want: &[xent::kld::reference::RefKldRow],
    katol: f64,
    krtol: f64,
    atol: f64,
    rtol: f64,
) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!("got {} rows, want {}", got.len(), want.len()));
    }
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !g.is_written() {
            return Err(format!("row {i}: never written (flags {:#x})", g.flags));
        }
        let gk = f64::from(g.kld);
        if !close(gk, w.kld, katol, krtol) {
            return Err(format!("row {i}: kld got {gk:e} want {:e} (error {:e})", w.kld, (gk - w.kld).abs()));
        }
        if w.kld.is_finite() && gk.is_finite() {
            worst = worst.max((gk - w.kld).abs() / (katol + krtol * w.kld.abs()));
        }
        for (name, g, w) in
            [("nll_base", g.nll_base, w.nll_base), ("nll_test", g.nll_test, w.nll_test), ("dp", g.dp, w.dp)]
        {
            if !close(f64::from(g), w, atol, rtol) {
                return Err(format!("row {i}: {name} got {g:e} want {w:e}"));
            }
        }
        let am = |x: Option<usize>| x.map_or(u32::MAX, |v| v as u32);
        if !w.ignored && (g.argmax_base != am(w.argmax_base) || g.argmax_test != am(w.argmax_test)) {
            return Err(format!(
                "row {i}: argmax got {} / {} want {:?} / {:?}",
                g.argmax_base, g.argmax_test, w.argmax_base, w.argmax_test
            ));
        }
        if g.ignored() != w.ignored || g.same_top() != w.same_top || g.has_target() != w.has_target {
            return Err(format!("row {i}: flags {:#x} but reference {w:?}", g.flags));
        }
    }
    Ok(worst)
}

/// Lowers `ctx`'s largest binding to about 4 KiB — plus the slack a window needs at this adapter's
/// storage offset alignment (256 bytes on SwiftShader) — so that small inputs are cut into many
/// chunks while a row of 1000 f32 logits still fits one binding.
pub fn small_bindings(ctx: &mut GpuContext) {
    let align = u64::from(ctx.device().limits().min_storage_buffer_offset_alignment);
    ctx.set_max_binding_bytes(4096 + 2 * align);
}
