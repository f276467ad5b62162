//! Branch-free scalar approximations written so that loops over slices auto-vectorise.
//!
//! `f32::exp` and libm's `erff` are opaque calls the compiler cannot vectorise; on the GELU and
//! softmax tensors of a BERT step (millions of elements per layer) they dominate the kernel time.
//! These versions use only arithmetic, comparisons and bit casts (SSE2 has all of them).

/// Below this, `e^x` is under f32's normal range and [`exp`] returns exactly 0.
pub const EXP_UNDERFLOW: f32 = -87.3;

/// `e^x` with ~2 ulp relative error on the clamped range (Cephes' expf polynomial after a
/// round-to-nearest range reduction done with the 1.5·2²³ trick, which needs no `round` call).
///
/// Never subnormal: below [`EXP_UNDERFLOW`] the result is exactly 0. Masked attention scores
/// (−1e9) land there, and a subnormal probability multiplied through the attention gemms makes
/// every FMA that touches it take a microcode assist on Intel cores (~100× slower), which is how
/// a padded length-256 batch once took minutes per step.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let underflow = x < EXP_UNDERFLOW;
    let x = x.clamp(EXP_UNDERFLOW, 88.7);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r2
        * r
        + 0.5 * r2
        + r
        + 1.0;
    // The low mantissa bits of `t` hold n (two's complement); build 2^n from them.
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let pow2n = f32::from_bits(((ni + 127) << 23) as u32);
    // A select, not a branch: the loops over slices still vectorise.
    if underflow { 0.0 } else { p * pow2n }
}

/// `v`, or 0 where `v` is subnormal (|v| < f32::MIN_POSITIVE): for normalised probabilities,
/// where `e·(1/sum)` can fall below the normal range although `e` did not (see [`exp`]).
#[inline(always)]
pub fn flush_subnormal(v: f32) -> f32 {
    if v.abs() < f32::MIN_POSITIVE { 0.0 } else { v }
}

/// GELU (erf form, HF `gelu`) and its derivative, sharing one `exp`.
///
/// erf follows Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7): with u = |x|/√2,
/// erf(u) ≈ 1 − poly(t)·e^(−u²), t = 1/(1 + p·u), and e^(−u²) = e^(−x²/2) is also the Gaussian
/// density term of the derivative `Φ(x) + x·φ(x)`.
#[inline(always)]
pub fn gelu_with_grad(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let u = x.abs() * FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * u);
    let e = exp(-0.5 * x * x);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let erf_abs = 1.0 - poly * e;
    let erf = erf_abs.copysign(x);
    let cdf = 0.5 * (1.0 + erf);
    (x * cdf, cdf + x * e * INV_SQRT_2PI)
}

/// Lanes of the row reductions below: the maximum and the sums are kept in sixteen interleaved
/// accumulators so the loops vectorise (a single running `f32` would be one serial chain);
/// sixteen fill one AVX-512 register, two AVX2 ones or four SSE2 ones (see [`super::isa`]).
const LANES: usize = 16;

/// The largest value of `row` (−∞ for an empty row).
#[inline(always)]
pub fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Replaces each value `v` of `row` by `e^(v − max)` and returns their sum.
#[inline(always)]
fn exp_minus(row: &mut [f32], max: f32) -> f32 {
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    lane_sum(row)
}

/// `Σ row`, in [`LANES`] interleaved partial sums.
#[inline(always)]
pub fn lane_sum(row: &[f32]) -> f32 {
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += v;
        }
    }
    chunks.remainder().iter().sum::<f32>() + sums.iter().sum::<f32>()
}

/// `Σ a·b` over two equally long rows, in [`LANES`] interleaved partial sums.
#[inline(always)]
pub fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &x), &y) in sums.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    tail + sums.iter().sum::<f32>()
}

/// Replaces each value `v` of `row` by `e^(v − max(row))` and returns their sum: a softmax
/// without the division, for callers that fold `1/sum` into a later product.
#[inline(always)]
pub fn exp_minus_max(row: &mut [f32]) -> f32 {
    exp_minus(row, row_max(row))
}

/// In-place softmax of one row (subnormal results flushed to 0, see [`exp`]); returns the row's
/// log-sum-exp, which the LM head keeps for its backward pass.
#[inline(always)]
pub fn softmax_row(row: &mut [f32]) -> f32 {
    let max = row_max(row);
    let sum = exp_minus(row, max);
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v = flush_subnormal(*v * inv);
    }
    max + sum.ln()
}

/// `log Σ exp(x)` of one row, leaving the row as it is.
#[inline(always)]
pub fn row_logsumexp(row: &[f32]) -> f32 {
    let max = row_max(row);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += exp(v - max);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - max)).sum();
    max + (tail + sums.iter().sum::<f32>()).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_over_the_useful_range() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.013;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(-1000.0).min(1e-37), exp(-1000.0));
    }

    #[test]
    fn exp_is_never_subnormal() {
        assert_eq!(exp(-1.0e9), 0.0);
        assert_eq!(exp(-88.0), 0.0);
        let mut x = -110.0f32;
        while x < 0.0 {
            let y = exp(x);
            assert!(y == 0.0 || y.is_normal(), "exp({x}) = {y:e} is subnormal");
            x += 0.01;
        }
        assert!(exp(EXP_UNDERFLOW).is_normal());
        assert_eq!(flush_subnormal(1.0e-40), 0.0);
        assert_eq!(flush_subnormal(-1.0e-40), 0.0);
        assert_eq!(flush_subnormal(2.0e-38), 2.0e-38);
    }

    #[test]
    fn gelu_matches_libm_erf_form() {
        let mut x = -8.0f32;
        while x < 8.0 {
            let xd = f64::from(x);
            let erf = candle_core::cpu::erf::erf_f64(xd / std::f64::consts::SQRT_2);
            let want = 0.5 * xd * (1.0 + erf);
            let pdf = (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let want_grad = 0.5 * (1.0 + erf) + xd * pdf;
            let (y, g) = gelu_with_grad(x);
            assert!(
                (f64::from(y) - want).abs() < 1e-6,
                "gelu({x}) = {y}, want {want}"
            );
            assert!(
                (f64::from(g) - want_grad).abs() < 1e-6,
                "gelu'({x}) = {g}, want {want_grad}"
            );
            x += 0.01;
        }
    }
}
