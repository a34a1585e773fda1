//! Synthetic evaluation sets that look like a language model's output: peaked, Zipf-like
//! logits, and targets drawn mostly from the model's own distribution. Deterministic per seed.

use rayon::prelude::*;

/// A small, fast, seedable generator (SplitMix64). Not cryptographic; reproducible everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Generates `rows x vocab` f32 logits and one i64 target per row (see [`Generator`]).
///
/// # Panics
/// If `rows * vocab` overflows `usize` (or the allocation fails).
pub fn eval_set(rows: usize, vocab: usize, seed: u64, ignore_index: i64) -> (Vec<f32>, Vec<i64>) {
    let gen = Generator::new(vocab, seed, ignore_index);
    let mut logits = vec![0f32; rows.checked_mul(vocab).expect("rows * vocab overflows usize")];
    let mut targets = vec![0i64; rows];
    gen.fill(0, &mut logits, &mut targets);
    (logits, targets)
}

/// A deterministic source of language-model-like rows: row `r` depends only on the seed and `r`,
/// so any block of rows can be generated on its own (for files larger than memory).
///
/// Each row is a Zipf prior over a fixed shuffle of the vocabulary, plus noise, plus a few
/// strongly boosted "in context" tokens; 90% of targets are sampled from the row's softmax,
/// the rest uniformly, and about 2% are `ignore_index` (padding).
#[derive(Debug, Clone)]
pub struct Generator {
    prior: Vec<f32>,
    seed: u64,
    ignore_index: i64,
}

impl Generator {
    /// A generator for rows of `vocab` logits (`vocab > 0`).
    pub fn new(vocab: usize, seed: u64, ignore_index: i64) -> Self {
        let mut rng = Rng::new(seed);
        // Zipf prior: the token of rank k gets -1.1 * ln(1 + k); ranks are a fixed shuffle.
        let mut rank: Vec<usize> = (0..vocab).collect();
        for i in (1..vocab).rev() {
            rank.swap(i, rng.below(i + 1));
        }
        let prior = rank.iter().map(|&k| (-1.1 * (1.0 + k as f64).ln()) as f32).collect();
        Generator { prior, seed, ignore_index }
    }

    /// Fills rows `first_row..` : `logits` holds whole rows, `targets` one per row.
    pub fn fill(&self, first_row: usize, logits: &mut [f32], targets: &mut [i64]) {
        let vocab = self.prior.len().max(1);
        logits.par_chunks_mut(vocab).zip(targets.par_iter_mut()).enumerate().for_each(|(i, (x, t))| {
            let r = (first_row + i) as u64;
            let mut rng = Rng::new(self.seed ^ (r + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
            for (v, p) in x.iter_mut().zip(&self.prior) {
                *v = p + (0.8 * rng.normal()) as f32;
            }
            for _ in 0..3 {
                x[rng.below(vocab)] += 8.0 + 4.0 * rng.uniform() as f32;
            }
            *t = if rng.uniform() < 0.02 {
                self.ignore_index
            } else if rng.uniform() < 0.9 {
                sample(x, rng.uniform()) as i64
            } else {
                rng.below(vocab) as i64
            };
        });
    }
}

/// Adds Gaussian noise of standard deviation `noise` to rows `first_row..` of `logits` (whole rows
/// of `vocab`), deterministically per `(seed, row)`: the "test model" of a generated pair, so that
/// any block of a large pair of files can be generated on its own.
pub fn perturb(logits: &mut [f32], vocab: usize, first_row: usize, seed: u64, noise: f32) {
    logits.par_chunks_mut(vocab.max(1)).enumerate().for_each(|(i, x)| {
        let r = (first_row + i) as u64;
        let mut rng = Rng::new(!seed ^ (r + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for v in x {
            *v += noise * rng.normal() as f32;
        }
    });
}

/// Index drawn from softmax(x) by inverse CDF at `u` in `[0, 1)`.
fn sample(x: &[f32], u: f64) -> usize {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let total: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
    let mut acc = 0.0;
    for (j, &v) in x.iter().enumerate() {
        acc += (v as f64 - m).exp() / total;
        if acc > u {
            return j;
        }
    }
    x.len() - 1
}

/// A pair of models' logits over the same tokens, for KL-divergence tests and benchmarks: the base
/// is [`eval_set`]'s language-model-like rows, the test is the base plus Gaussian noise of standard
/// deviation `noise` per logit (1e-3 to 1e-2: a good quantisation; 1: an unrelated-looking model).
/// Targets as [`eval_set`]'s, `-100` for ignored rows.
///
/// # Panics
/// As [`eval_set`].
pub fn kld_pair(rows: usize, vocab: usize, seed: u64, noise: f32) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let (base, targets) = eval_set(rows, vocab, seed, -100);
    let mut rng = Rng::new(seed ^ 0x6b6c_6421);
    let test = base.iter().map(|&x| x + noise * rng.normal() as f32).collect();
    (base, test, targets)
}
