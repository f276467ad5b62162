//! Small, dependency-free statistics: the normal distribution's CDF and quantile, Wilson score
//! intervals for proportions, normal intervals for means, and the one-sided tests the quality
//! trigger uses. Accuracy ~1e-7, far below what feedback counts can resolve.

use serde::{Deserialize, Serialize};

/// An estimate with a two-sided confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

/// Standard normal CDF, via erfc (Abramowitz & Stegun 7.1.26 refined by a continued fraction
/// would be overkill here: |error| < 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    // Numerical Recipes' erfcc: fractional error < 1.2e-7 everywhere.
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, |rel error| < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0, "quantile of p={p}");
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The z value of a two-sided interval at `confidence` (0.95 → 1.96).
pub fn two_sided_z(confidence: f64) -> f64 {
    normal_quantile(0.5 + confidence / 2.0)
}

/// Wilson score interval for `successes` out of `n` (well-behaved at small n and at 0% / 100%).
pub fn wilson(successes: u64, n: u64, confidence: f64) -> Option<Interval> {
    if n == 0 {
        return None;
    }
    let z = two_sided_z(confidence);
    let n = n as f64;
    let p = successes as f64 / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some(Interval {
        estimate: p,
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
    })
}

/// Sample mean and variance (unbiased) from a count, sum and sum of squares.
pub fn mean_var(n: u64, sum: f64, sq_sum: f64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let nf = n as f64;
    let mean = sum / nf;
    let var = if n > 1 {
        ((sq_sum - nf * mean * mean) / (nf - 1.0)).max(0.0)
    } else {
        0.0
    };
    Some((mean, var))
}

/// Normal-approximation interval for a mean, clamped to the scale's `[lo, hi]`.
pub fn mean_interval(
    n: u64,
    sum: f64,
    sq_sum: f64,
    confidence: f64,
    lo: f64,
    hi: f64,
) -> Option<Interval> {
    let (mean, var) = mean_var(n, sum, sq_sum)?;
    let half = two_sided_z(confidence) * (var / n as f64).sqrt();
    Some(Interval {
        estimate: mean,
        low: (mean - half).max(lo),
        high: (mean + half).min(hi),
    })
}

/// One-sided two-proportion z-test that rate B (recent) is below rate A (baseline).
/// Returns (z, p-value); z < 0 when B is lower. Pooled standard error, as textbooks use.
pub fn proportion_drop(a_success: u64, a_n: u64, b_success: u64, b_n: u64) -> Option<(f64, f64)> {
    if a_n == 0 || b_n == 0 {
        return None;
    }
    let (an, bn) = (a_n as f64, b_n as f64);
    let (pa, pb) = (a_success as f64 / an, b_success as f64 / bn);
    let pooled = (a_success + b_success) as f64 / (an + bn);
    let se = (pooled * (1.0 - pooled) * (1.0 / an + 1.0 / bn)).sqrt();
    if se == 0.0 {
        // Both windows all-positive or all-negative: identical, no evidence of a drop.
        return Some((0.0, 0.5));
    }
    let z = (pb - pa) / se;
    Some((z, normal_cdf(z)))
}

/// One-sided Welch z-test that mean B is below mean A (large-sample normal approximation).
pub fn mean_drop(a: (u64, f64, f64), b: (u64, f64, f64)) -> Option<(f64, f64)> {
    let (ma, va) = mean_var(a.0, a.1, a.2)?;
    let (mb, vb) = mean_var(b.0, b.1, b.2)?;
    let se = (va / a.0 as f64 + vb / b.0 as f64).sqrt();
    if se == 0.0 {
        let z = if mb < ma { f64::NEG_INFINITY } else { 0.0 };
        return Some((z, if mb < ma { 0.0 } else { 0.5 }));
    }
    let z = (mb - ma) / se;
    Some((z, normal_cdf(z)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_and_cdf_agree_with_tables() {
        assert!((two_sided_z(0.95) - 1.959_963_985).abs() < 1e-6);
        assert!((normal_cdf(1.0) - 0.841_344_746).abs() < 1e-6);
        assert!((normal_cdf(-2.0) - 0.022_750_132).abs() < 1e-6);
        for p in [0.001, 0.02, 0.3, 0.5, 0.9, 0.999] {
            assert!((normal_cdf(normal_quantile(p)) - p).abs() < 1e-6, "p={p}");
        }
    }

    #[test]
    fn wilson_matches_a_worked_example() {
        // 81 of 263 at 95%: Wilson interval (0.2553, 0.3662) (Newcombe 1998 style worked value).
        let i = wilson(81, 263, 0.95).unwrap();
        assert!(
            (i.low - 0.2553).abs() < 1e-3 && (i.high - 0.3662).abs() < 1e-3,
            "{i:?}"
        );
        let all = wilson(10, 10, 0.95).unwrap();
        assert!(all.high <= 1.0 && all.low > 0.6);
        assert!(wilson(0, 0, 0.95).is_none());
    }

    #[test]
    fn wilson_matches_a_hand_computation_at_small_n() {
        // 8 of 10, z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10) = 0.716740, half-width
        // z / (1 + z²/10) * sqrt(0.016 + z²/400) = 0.226578.
        let i = wilson(8, 10, 0.95).unwrap();
        assert_eq!(i.estimate, 0.8);
        assert!((i.low - 0.490_162).abs() < 1e-5, "{i:?}");
        assert!((i.high - 0.943_318).abs() < 1e-5, "{i:?}");
        // 0 of 5: the interval starts at 0 and its upper end is z² / (n + z²).
        let none = wilson(0, 5, 0.95).unwrap();
        let z2 = two_sided_z(0.95).powi(2);
        assert_eq!(none.low, 0.0);
        assert!((none.high - z2 / (5.0 + z2)).abs() < 1e-9, "{none:?}");
    }

    #[test]
    fn drop_tests_have_the_right_sign() {
        let (z, p) = proportion_drop(80, 100, 60, 100).unwrap();
        assert!(z < -2.0 && p < 0.01);
        let (z, p) = proportion_drop(60, 100, 60, 100).unwrap();
        assert!(z.abs() < 1e-12 && (p - 0.5).abs() < 1e-6);
        let (z, _) = mean_drop((100, 400.0, 1700.0), (100, 300.0, 1000.0)).unwrap();
        assert!(z < 0.0);
    }
}
