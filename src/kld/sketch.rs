//! A small deterministic, mergeable quantile sketch for `f32` values, with relative accuracy
//! [`RELATIVE_ACCURACY`] (2⁻¹⁴ ≈ 6.1e-5).
//!
//! ## Buckets
//! A finite non-zero value goes to the bucket of its magnitude's bit pattern shifted right by
//! `23 − MANTISSA_BITS`: its exponent and the top [`MANTISSA_BITS`] bits of its mantissa. Within a
//! binade `[2^e, 2^(e+1))` that gives 2¹³ buckets of equal width, so a bucket `[lo, hi)` has
//! `hi/lo ≤ 1 + 2⁻¹³`, and its representative `2·lo·hi/(lo + hi)` is within `(hi − lo)/(hi + lo) ≤ 2⁻¹⁴`
//! of every value in it (for normal numbers, `|v| ≥ f32::MIN_POSITIVE`; subnormals keep their
//! absolute position only). Positive and negative values have their own buckets; exact zeros are
//! counted apart (a zero quantile is exactly 0); infinities are counted apart and sit at the ends.
//! Minimum and maximum are kept exactly, and every representative is clamped to them.
//!
//! ## Why not `sketches-ddsketch`
//! `sketches-ddsketch` 0.4.2 (the version on crates.io) handles negatives, zeros, merging and serde,
//! but: its `DDSketch` keeps an `f64` running sum (so a merged sketch is not bit-identical to a
//! one-pass sketch, and the summary built on it could not be compared exactly), it implements
//! neither `Debug` nor `PartialEq`, its dense store's layout depends on the insertion history, its
//! bucket index goes through `ln` (libm may differ by an ulp between machines), and it answers a
//! quantile only at the lower rank of `q·(n−1)`, while llama.cpp interpolates between two ranks.
//! This sketch is integer-only: indexing is a shift of the bit pattern, counts are `u64`, so any
//! grouping of values gives the same sketch on any machine.
//!
//! ## Memory
//! Each sign keeps a dense `u64` array over the range of keys it has seen: about 8192 buckets per
//! factor of two of range (≈ 2 MB for values spanning 1e-8 … 10), never more than
//! 2²¹ buckets (16 MiB) per sign whatever the number of values.

use serde_json::{json, Value};

/// Mantissa bits kept in a bucket key.
pub const MANTISSA_BITS: u32 = 13;
/// Right shift from an `f32` bit pattern to its bucket key.
const SHIFT: u32 = 23 - MANTISSA_BITS;
/// Largest key of a finite value (`f32::MAX`).
const MAX_KEY: u32 = 0x7F7F_FFFF >> SHIFT;
/// Relative accuracy of every quantile this sketch returns for normal `f32` values:
/// `|estimate − v| ≤ RELATIVE_ACCURACY·|v|` where `v` is the value at the same rank.
pub const RELATIVE_ACCURACY: f64 = 1.0 / 16384.0;

/// Dense counts over keys `first .. first + counts.len()`, grown on demand (with slack, so that
/// growth is amortised O(1) per value).
#[derive(Clone, Debug, Default)]
struct Buckets {
    first: u32,
    counts: Vec<u64>,
    total: u64,
}

impl Buckets {
    fn add(&mut self, key: u32, n: u64) {
        if n == 0 {
            return;
        }
        self.cover(key, key);
        self.counts[(key - self.first) as usize] += n;
        self.total += n;
    }

    /// Makes `lo ..= hi` addressable.
    fn cover(&mut self, lo: u32, hi: u32) {
        if self.counts.is_empty() {
            self.first = lo;
            self.counts = vec![0; (hi - lo) as usize + 1];
            return;
        }
        let slack = (self.counts.len() / 2).max(64) as u32;
        if lo < self.first {
            let new_first = lo.saturating_sub(slack);
            let mut counts = vec![0; (self.first - new_first) as usize];
            counts.extend_from_slice(&self.counts);
            self.counts = counts;
            self.first = new_first;
        }
        let end = self.first + self.counts.len() as u32; // exclusive
        if hi >= end {
            let new_end = hi.saturating_add(slack).min(MAX_KEY) + 1;
            self.counts.resize((new_end - self.first) as usize, 0);
        }
    }

    /// Non-empty buckets, ascending key.
    fn nonzero(&self) -> impl DoubleEndedIterator<Item = (u32, u64)> + '_ {
        self.counts.iter().enumerate().filter(|(_, &c)| c > 0).map(move |(i, &c)| (self.first + i as u32, c))
    }

    fn merge(&mut self, other: &Buckets) {
        let (Some((lo, _)), Some((hi, _))) = (other.nonzero().next(), other.nonzero().next_back()) else {
            return;
        };
        self.cover(lo, hi);
        for (k, c) in other.nonzero() {
            self.counts[(k - self.first) as usize] += c;
        }
        self.total += other.total;
    }

    /// Key of the bucket holding the `rank`-th value (0-based) in ascending (`rev == false`) or
    /// descending key order.
    fn key_at(&self, rank: u64, rev: bool) -> Option<u32> {
        let mut seen = 0u64;
        let mut find = |(k, c): (u32, u64)| {
            seen += c;
            (seen > rank).then_some(k)
        };
        if rev {
            self.nonzero().rev().find_map(&mut find)
        } else {
            self.nonzero().find_map(&mut find)
        }
    }

    /// `[first_key, count, key_delta, count, …]` over non-empty buckets.
    fn to_json(&self) -> Value {
        let mut out = Vec::new();
        let mut prev = 0u32;
        for (i, (k, c)) in self.nonzero().enumerate() {
            out.push(Value::from(if i == 0 { k } else { k - prev }));
            out.push(Value::from(c));
            prev = k;
        }
        Value::Array(out)
    }

    fn from_json(v: &Value, what: &str) -> Result<Buckets, String> {
        let arr = v.as_array().ok_or_else(|| format!("sketch '{what}' is not an array"))?;
        if arr.len() % 2 != 0 {
            return Err(format!("sketch '{what}' has an odd number of entries"));
        }
        let mut b = Buckets::default();
        let mut key = 0u64;
        for (i, pair) in arr.chunks(2).enumerate() {
            let (Some(d), Some(c)) = (pair[0].as_u64(), pair[1].as_u64()) else {
                return Err(format!("sketch '{what}': entry {i} is not a pair of counts"));
            };
            if i > 0 && d == 0 {
                return Err(format!("sketch '{what}': keys not increasing at entry {i}"));
            }
            key += d;
            if key > u64::from(MAX_KEY) || c == 0 {
                return Err(format!("sketch '{what}': entry {i} (key {key}, count {c}) out of range"));
            }
            b.add(key as u32, c);
            if b.total < c {
                return Err(format!("sketch '{what}': counts overflow"));
            }
        }
        Ok(b)
    }
}

impl PartialEq for Buckets {
    fn eq(&self, other: &Self) -> bool {
        self.total == other.total && self.nonzero().eq(other.nonzero())
    }
}

/// The representative of a bucket: `2·lo·hi/(lo + hi)`, equally far (relatively) from both ends.
fn representative(key: u32) -> f64 {
    let lo = f64::from(f32::from_bits(key << SHIFT));
    let hi_bits = (key + 1) << SHIFT;
    let hi = if hi_bits >= 0x7F80_0000 { f64::from(f32::MAX) } else { f64::from(f32::from_bits(hi_bits)) };
    if lo == 0.0 {
        0.5 * hi
    } else {
        2.0 * lo * hi / (lo + hi)
    }
}

/// A mergeable quantile sketch of `f32` values (see the module docs). NaN values are not added.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantileSketch {
    zero: u64,
    pos: Buckets,
    neg: Buckets,
    pos_inf: u64,
    neg_inf: u64,
    /// Smallest finite value (`+inf` when none).
    min: f32,
    /// Largest finite value (`−inf` when none).
    max: f32,
}

impl Default for QuantileSketch {
    fn default() -> Self {
        QuantileSketch {
            zero: 0,
            pos: Buckets::default(),
            neg: Buckets::default(),
            pos_inf: 0,
            neg_inf: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
}

impl QuantileSketch {
    /// An empty sketch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one value. NaN is ignored (returns `false`); everything else is counted.
    pub fn add(&mut self, v: f32) -> bool {
        if v.is_nan() {
            return false;
        }
        if v == 0.0 {
            self.zero += 1;
        } else if v == f32::INFINITY {
            self.pos_inf += 1;
            return true;
        } else if v == f32::NEG_INFINITY {
            self.neg_inf += 1;
            return true;
        } else {
            let key = v.abs().to_bits() >> SHIFT;
            if v > 0.0 {
                self.pos.add(key, 1);
            } else {
                self.neg.add(key, 1);
            }
        }
        let v = v + 0.0; // −0 → +0
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        true
    }

    /// Adds every value of `other`: exactly the sketch of both inputs, whatever the grouping.
    pub fn merge(&mut self, other: &QuantileSketch) {
        self.zero += other.zero;
        self.pos_inf += other.pos_inf;
        self.neg_inf += other.neg_inf;
        self.pos.merge(&other.pos);
        self.neg.merge(&other.neg);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of values added (NaN excluded).
    pub fn count(&self) -> u64 {
        self.zero + self.pos.total + self.neg.total + self.pos_inf + self.neg_inf
    }

    /// The smallest value, exactly (NaN when empty).
    pub fn min(&self) -> f32 {
        if self.neg_inf > 0 {
            f32::NEG_INFINITY
        } else if self.min <= self.max {
            self.min
        } else if self.pos_inf > 0 {
            f32::INFINITY
        } else {
            f32::NAN
        }
    }

    /// The largest value, exactly (NaN when empty).
    pub fn max(&self) -> f32 {
        if self.pos_inf > 0 {
            f32::INFINITY
        } else if self.min <= self.max {
            self.max
        } else if self.neg_inf > 0 {
            f32::NEG_INFINITY
        } else {
            f32::NAN
        }
    }

    /// An estimate of the `rank`-th smallest value (0-based), within [`RELATIVE_ACCURACY`] of it
    /// (exact for zeros, infinities, the minimum and the maximum). NaN when `rank >= count()`.
    pub fn value_at_rank(&self, rank: u64) -> f64 {
        if rank >= self.count() {
            return f64::NAN;
        }
        if rank == 0 {
            return f64::from(self.min());
        }
        if rank == self.count() - 1 {
            return f64::from(self.max());
        }
        let clamp = |x: f64| x.clamp(f64::from(self.min), f64::from(self.max));
        let mut r = rank;
        if r < self.neg_inf {
            return f64::NEG_INFINITY;
        }
        r -= self.neg_inf;
        if r < self.neg.total {
            return self.neg.key_at(r, true).map_or(f64::NAN, |k| clamp(-representative(k)));
        }
        r -= self.neg.total;
        if r < self.zero {
            return 0.0;
        }
        r -= self.zero;
        if r < self.pos.total {
            return self.pos.key_at(r, false).map_or(f64::NAN, |k| clamp(representative(k)));
        }
        f64::INFINITY
    }

    /// llama.cpp's percentile (see [`crate::kld::summary::llama_percentile`]) with the sketch's
    /// values at the two ranks it interpolates between. NaN when empty.
    pub fn percentile(&self, fraction: f32) -> f64 {
        let n = self.count();
        if n == 0 {
            return f64::NAN;
        }
        crate::kld::summary::llama_interpolate(n, fraction, |i| self.value_at_rank(i) as f32).into()
    }

    /// llama.cpp's median rule (see [`crate::kld::summary::llama_median`]) on the sketch. NaN when empty.
    pub fn median(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            return f64::NAN;
        }
        crate::kld::summary::llama_median_by(n, |i| self.value_at_rank(i) as f32).into()
    }

    /// Approximate heap bytes held by the bucket arrays.
    pub fn heap_bytes(&self) -> usize {
        8 * (self.pos.counts.capacity() + self.neg.counts.capacity())
    }

    /// The sketch as a JSON object: counts, the exact finite minimum and maximum (as strings, `null`
    /// when none) and the non-empty buckets (`[first key, count, key delta, count, …]`).
    pub fn to_json(&self) -> Value {
        // As strings: `f32` text reads back exactly, whatever the JSON parser does with floats.
        let finite = |x: f32| if x.is_finite() { Value::from(x.to_string()) } else { Value::Null };
        json!({
            "mantissa_bits": MANTISSA_BITS,
            "zero": self.zero,
            "pos_inf": self.pos_inf,
            "neg_inf": self.neg_inf,
            "min": finite(self.min),
            "max": finite(self.max),
            "pos": self.pos.to_json(),
            "neg": self.neg.to_json(),
        })
    }

    /// Reads [`QuantileSketch::to_json`]'s object back.
    ///
    /// # Errors
    /// A message saying what is missing or inconsistent (another bucket layout, keys out of order
    /// or range, minimum/maximum missing or contradicting the buckets).
    pub fn from_json(v: &Value, what: &str) -> Result<QuantileSketch, String> {
        let count =
            |k: &str| v.get(k).and_then(Value::as_u64).ok_or_else(|| format!("sketch '{what}' has no count '{k}'"));
        let bits = count("mantissa_bits")?;
        if bits != u64::from(MANTISSA_BITS) {
            return Err(format!("sketch '{what}' has {bits} mantissa bits (this build reads {MANTISSA_BITS})"));
        }
        let bound = |k: &str| -> Result<Option<f32>, String> {
            match v.get(k) {
                Some(Value::Null) => Ok(None),
                Some(x) => match x.as_str().and_then(|t| t.parse::<f32>().ok()) {
                    Some(f) if f.is_finite() => Ok(Some(f + 0.0)),
                    _ => Err(format!("sketch '{what}': '{k}' is not a finite f32 value")),
                },
                None => Err(format!("sketch '{what}' has no '{k}'")),
            }
        };
        let s = QuantileSketch {
            zero: count("zero")?,
            pos_inf: count("pos_inf")?,
            neg_inf: count("neg_inf")?,
            pos: Buckets::from_json(v.get("pos").unwrap_or(&Value::Null), &format!("{what}.pos"))?,
            neg: Buckets::from_json(v.get("neg").unwrap_or(&Value::Null), &format!("{what}.neg"))?,
            min: bound("min")?.unwrap_or(f32::INFINITY),
            max: bound("max")?.unwrap_or(f32::NEG_INFINITY),
        };
        let finite = s.zero.checked_add(s.pos.total).and_then(|x| x.checked_add(s.neg.total));
        let finite = finite.ok_or_else(|| format!("sketch '{what}': counts overflow"))?;
        let has_bounds = s.min <= s.max;
        if (finite > 0) != has_bounds {
            return Err(format!("sketch '{what}': minimum/maximum disagree with the counts"));
        }
        // The exact extremes must fall in the outermost occupied buckets.
        let key = |x: f32| x.abs().to_bits() >> SHIFT;
        let lowest = s.neg.nonzero().next_back().map(|(k, _)| (k, -1)).or(if s.zero > 0 {
            Some((0, 0))
        } else {
            s.pos.nonzero().next().map(|(k, _)| (k, 1))
        });
        let highest = s.pos.nonzero().next_back().map(|(k, _)| (k, 1)).or(if s.zero > 0 {
            Some((0, 0))
        } else {
            s.neg.nonzero().next().map(|(k, _)| (k, -1))
        });
        let sign = |x: f32| {
            if x == 0.0 {
                0
            } else if x > 0.0 {
                1
            } else {
                -1
            }
        };
        let place = |x: f32| if x == 0.0 { (0, 0) } else { (key(x), sign(x)) };
        if has_bounds && (lowest != Some(place(s.min)) || highest != Some(place(s.max))) {
            return Err(format!("sketch '{what}': minimum/maximum outside the occupied buckets"));
        }
        Ok(s)
    }
}
