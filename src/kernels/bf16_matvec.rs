//! Decode-shaped products with a weight held in bf16 (`policy.precision: bf16`):
//! `y[m, n] = x[m, k] · W[n, k]ᵀ` for a few f32 input rows (m ≤ [`super::matvec::MAX_ROWS`]),
//! `W` read as the bf16 values it is stored as.
//!
//! Why: decoding reads every weight once per token and is bound by memory bandwidth, so a weight
//! in half the bytes should decode faster than f32. The bf16 gemm cannot deliver that for a
//! handful of rows: it repacks the whole weight matrix on every call, which made bf16 decoding
//! slower than f32 (166 s vs 95 s for a 1.7B-shape GRPO step). This kernel streams the weights
//! straight from their `[n, k]` layout as [`super::matvec`] does for f32 — one sequential
//! stream per task, each weight row dotted with up to [`MR`] input rows while it is in
//! registers, prefetched 8 KB ahead when there are several input rows — on the same parallel
//! frame ([`super::matvec::over_weight_rows`]).
//!
//! The input rows are rounded to bf16 once per product (round to nearest even, as the bf16 gemm
//! rounds its inputs), so every path computes the same exact bf16 × bf16 products and differs
//! only in the order of their f32 accumulation; prefill (the gemm) and decode (this kernel) thus
//! see the same operands. Three paths, chosen from the CPU's features ([`Bf16DotPath::fastest`]):
//! - AVX512_BF16: a 64-byte load holds 16 (even, odd) pairs of k in `vdpbf16ps`'s layout, for
//!   the weight row and for each (converted) input row alike, so one instruction does 32
//!   multiply-adds with no repacking;
//! - AVX2 + FMA: each bf16 is widened to f32 in registers (zero-extend, shift left 16) and
//!   multiplied with FMA, so the weights still cross memory in half the bytes;
//! - anything else: the same widening in scalar code.

// The two SIMD paths are `std::arch` intrinsics behind a run-time feature check, held by a token
// type that only a successful check creates; every unsafe block says which bound it relies on.
#![allow(unsafe_code)]

use super::bf16_gemm::{self, to_bf16_bits};
use super::matvec::{MR, over_weight_rows};

/// bf16 values in one 512-bit register: the input rows are padded to a multiple of this.
const BLOCK: usize = 32;
/// How far ahead of the loads the weights are prefetched with several input rows (bf16 values:
/// 8 KB, as the f32 kernel).
const PREFETCH_VALUES: usize = 4096;

/// How the bf16 products are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16DotPath {
    /// `vdpbf16ps` on pairs of bf16 (AVX-512 F/BW and AVX512_BF16).
    PairDot,
    /// Each bf16 widened to f32 in registers, then FMA (AVX2 + FMA).
    WidenAvx2,
    /// The same widening in scalar code.
    WidenScalar,
}

impl Bf16DotPath {
    /// The fastest path this CPU runs.
    pub fn fastest() -> Self {
        if PairDot::new().is_some() {
            Self::PairDot
        } else if WidenAvx2::new().is_some() {
            Self::WidenAvx2
        } else {
            Self::WidenScalar
        }
    }

    /// Whether this CPU can run the path.
    pub fn runs_here(self) -> bool {
        match self {
            Self::PairDot => PairDot::new().is_some(),
            Self::WidenAvx2 => WidenAvx2::new().is_some(),
            Self::WidenScalar => true,
        }
    }
}

/// `x[m, k] · w[n, k]ᵀ` as a row-major `[m, n]` vector, `w` given as bf16 bit patterns (as
/// candle's `bf16` tensors hold them), on the fastest path this CPU has. The slices must hold
/// exactly `m·k` and `n·k` values (checked: a mismatch is a programming error of the caller).
pub fn bf16_matmul_wt_slices(x: &[f32], w: &[u16], m: usize, n: usize, k: usize) -> Vec<f32> {
    bf16_matmul_wt_slices_on(Bf16DotPath::fastest(), x, w, m, n, k)
}

/// [`bf16_matmul_wt_slices`] on a chosen path: the hook that lets a test run every path this
/// CPU can run, the widening ones included on a CPU with AVX512_BF16.
///
/// Panics if the CPU cannot run `path` ([`Bf16DotPath::runs_here`]).
pub fn bf16_matmul_wt_slices_on(
    path: Bf16DotPath,
    x: &[f32],
    w: &[u16],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "bf16 matmul-wt: x is not {m}x{k}");
    assert_eq!(w.len(), n * k, "bf16 matmul-wt: w is not {n}x{k}");
    if k == 0 {
        return vec![0.0; m * n];
    }
    let rows = InputRows::new(x, m, k);
    let task = |j0: usize, count: usize, yt: &mut [f32]| {
        let w = &w[j0 * k..(j0 + count) * k];
        match path {
            Bf16DotPath::PairDot => weight_rows(PairDot::new().expect(UNSUPPORTED), &rows, w, yt),
            Bf16DotPath::WidenAvx2 => {
                weight_rows(WidenAvx2::new().expect(UNSUPPORTED), &rows, w, yt)
            }
            Bf16DotPath::WidenScalar => weight_rows(WidenScalar, &rows, w, yt),
        }
    };
    assert!(path.runs_here(), "{UNSUPPORTED}: {path:?}");
    over_weight_rows(m, n, k * 2, task)
}

const UNSUPPORTED: &str = "bf16 matmul-wt: this CPU cannot run the requested path";

/// The input rows rounded to bf16 once per product, each zero-padded to a whole number of
/// [`BLOCK`]s so that every path reads whole registers (the padding multiplies nothing: the
/// weight loads stop at k).
struct InputRows {
    bits: Vec<u16>,
    m: usize,
    k: usize,
    stride: usize,
}

impl InputRows {
    fn new(x: &[f32], m: usize, k: usize) -> Self {
        let stride = k.div_ceil(BLOCK) * BLOCK;
        let mut bits = vec![0u16; m * stride];
        for (dst, src) in bits.chunks_exact_mut(stride).zip(x.chunks_exact(k)) {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = to_bf16_bits(v);
            }
        }
        Self { bits, m, k, stride }
    }

    /// Input rows `i..i + R`.
    fn tile<const R: usize>(&self, i: usize) -> [&[u16]; R] {
        std::array::from_fn(|r| &self.bits[(i + r) * self.stride..(i + r + 1) * self.stride])
    }
}

/// One path's dot products of a weight row `w` (k values) with `R` padded input rows.
trait RowDots: Copy {
    fn dots<const R: usize>(self, xs: [&[u16]; R], w: &[u16], prefetch: bool) -> [f32; R];
}

/// One task: `yt[j·m + i] = w[j] · x[i]` for the task's weight rows `j` and every input row,
/// one weight row at a time in tiles of [`MR`], 4 and 1 input rows (as the f32 kernel walks).
fn weight_rows<P: RowDots>(path: P, rows: &InputRows, w: &[u16], yt: &mut [f32]) {
    let (m, k) = (rows.m, rows.k);
    // With one input row the loop is light enough for the hardware prefetcher alone.
    let prefetch = m > 1;
    for (wj, out) in w.chunks_exact(k).zip(yt.chunks_exact_mut(m)) {
        let mut i = 0;
        while i + MR <= m {
            out[i..i + MR].copy_from_slice(&path.dots::<MR>(rows.tile(i), wj, prefetch));
            i += MR;
        }
        if i + 4 <= m {
            out[i..i + 4].copy_from_slice(&path.dots::<4>(rows.tile(i), wj, prefetch));
            i += 4;
        }
        while i < m {
            out[i] = path.dots::<1>(rows.tile(i), wj, prefetch)[0];
            i += 1;
        }
    }
}

/// A bf16 bit pattern as the f32 it stands for (exact: bf16 is f32's upper half).
fn widened(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// The scalar path: every product exact in f32, summed in k order.
#[derive(Clone, Copy)]
struct WidenScalar;

impl RowDots for WidenScalar {
    fn dots<const R: usize>(self, xs: [&[u16]; R], w: &[u16], _prefetch: bool) -> [f32; R] {
        xs.map(|x| {
            x.iter()
                .zip(w)
                .map(|(&a, &b)| widened(a) * widened(b))
                .sum()
        })
    }
}

/// Proof that this CPU has AVX-512 F/BW and AVX512_BF16 (only [`PairDot::new`] makes one).
#[derive(Clone, Copy)]
struct PairDot(());

impl PairDot {
    fn new() -> Option<Self> {
        bf16_gemm::supported().then_some(Self(()))
    }
}

impl RowDots for PairDot {
    fn dots<const R: usize>(self, xs: [&[u16]; R], w: &[u16], prefetch: bool) -> [f32; R] {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `PairDot` exists only where the CPU has the features `pair_dots` enables.
        unsafe {
            pair_dots(xs, w, prefetch)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (xs, w, prefetch);
            unreachable!("PairDot is only made on x86-64")
        }
    }
}

/// Dot products of one weight row with `R` input rows through `vdpbf16ps`, 32 values of k per
/// instruction; the last partial block is a masked load of the weight (the input rows are
/// zero-padded past k).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_dots<const R: usize>(xs: [&[u16]; R], w: &[u16], prefetch: bool) -> [f32; R] {
    use std::arch::x86_64::*;
    let k = w.len();
    let whole = k / BLOCK;
    assert!(xs.iter().all(|x| x.len() >= k.div_ceil(BLOCK) * BLOCK));
    let mut acc = [_mm512_setzero_ps(); R];
    let mut step = |at: usize, wv: __m512bh| {
        for (a, x) in acc.iter_mut().zip(&xs) {
            // SAFETY: every input row holds whole blocks up to k rounded up (asserted above).
            let xv: __m512bh =
                unsafe { std::mem::transmute(_mm512_loadu_si512(x[at..].as_ptr().cast())) };
            *a = _mm512_dpbf16_ps(*a, xv, wv);
        }
    };
    for b in 0..whole {
        let at = b * BLOCK;
        if prefetch {
            super::matvec::prefetch(w.as_ptr().wrapping_add(at + PREFETCH_VALUES).cast());
        }
        // SAFETY: the 32 values from `at` lie inside `w` (`at + 32 ≤ whole · 32 ≤ k`).
        let wv = unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(w[at..].as_ptr().cast()))
        };
        step(at, wv);
    }
    let rest = k - whole * BLOCK;
    if rest > 0 {
        let at = whole * BLOCK;
        let mask: __mmask32 = (1u32 << rest) - 1;
        // SAFETY: the masked load reads only the `rest` values from `at`, which end at k; the
        // masked-off lanes are neither read nor able to fault.
        let wv = unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(
                mask,
                w[at..].as_ptr().cast(),
            ))
        };
        step(at, wv);
    }
    acc.map(|a| _mm512_reduce_add_ps(a))
}

/// Proof that this CPU has AVX2 and FMA (only [`WidenAvx2::new`] makes one).
#[derive(Clone, Copy)]
struct WidenAvx2(());

impl WidenAvx2 {
    fn new() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            (std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"))
            .then_some(Self(()))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }
}

impl RowDots for WidenAvx2 {
    fn dots<const R: usize>(self, xs: [&[u16]; R], w: &[u16], prefetch: bool) -> [f32; R] {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `WidenAvx2` exists only where the CPU has the features `widened_dots`
        // enables.
        unsafe {
            widened_dots(xs, w, prefetch)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (xs, w, prefetch);
            unreachable!("WidenAvx2 is only made on x86-64")
        }
    }
}

/// Dot products of one weight row with `R` input rows, 8 values of k per step: each bf16
/// zero-extended to 32 bits and shifted into f32's upper half, then FMA; the last k mod 8
/// values in scalar.
/// f32 lanes of one AVX2 register.
#[cfg(target_arch = "x86_64")]
const LANES: usize = 8;

/// The first 8 values of `v` (bf16) widened to f32: zero-extended to 32 bits, shifted into the
/// upper half.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn widen8(v: &[u16]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    assert!(v.len() >= LANES);
    // SAFETY: the 8 values (16 bytes) read lie inside `v` (asserted).
    let half = unsafe { _mm_loadu_si128(v.as_ptr().cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn widened_dots<const R: usize>(xs: [&[u16]; R], w: &[u16], prefetch: bool) -> [f32; R] {
    use std::arch::x86_64::*;
    let k = w.len();
    let whole = k / LANES;
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..whole {
        let at = b * LANES;
        if prefetch && b % 4 == 0 {
            super::matvec::prefetch(w.as_ptr().wrapping_add(at + PREFETCH_VALUES).cast());
        }
        let wv = widen8(&w[at..]);
        for (a, x) in acc.iter_mut().zip(&xs) {
            *a = _mm256_fmadd_ps(widen8(&x[at..]), wv, *a);
        }
    }
    std::array::from_fn(|r| {
        let tail: f32 = (whole * LANES..k)
            .map(|p| widened(xs[r][p]) * widened(w[p]))
            .sum();
        let quad = _mm_add_ps(
            _mm256_castps256_ps128(acc[r]),
            _mm256_extractf128_ps::<1>(acc[r]),
        );
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        let one = _mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair));
        _mm_cvtss_f32(one) + tail
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16_gemm::{reference_bf16_gemm, round_to_bf16};

    /// Deterministic values in [-1, 1) from a seed, with magnitudes spread over a few decades
    /// (a dot product of equal-sized terms would hide accumulation-order effects).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let scales = [1.0, 0.1, 0.01];
        let unit = crate::kernels::bf16_gemm::tests::values(len, seed);
        unit.iter()
            .zip(scales.iter().cycle())
            .map(|(v, s)| v * s)
            .collect()
    }

    fn all_paths() -> Vec<Bf16DotPath> {
        use Bf16DotPath::*;
        let here: Vec<_> = [PairDot, WidenAvx2, WidenScalar]
            .into_iter()
            .filter(|p| p.runs_here())
            .collect();
        if !here.contains(&PairDot) {
            eprintln!("note: this CPU lacks AVX512_BF16; the vdpbf16ps path is not tested here");
        }
        here
    }

    /// Every path equals the scalar reference (both operands bf16, exact products, f64 sum)
    /// within the f32 accumulation bound, on shapes whose k is not a multiple of 32 (nor of 8),
    /// odd n, and every m up to MAX_ROWS (tiles of 8, 4 and 1 rows, and their mixes).
    #[test]
    fn every_path_equals_the_scalar_reference_on_odd_shapes() {
        let paths = all_paths();
        let mut seed = 7;
        for (n, k) in [(1, 1), (7, 31), (33, 77), (129, 100), (65, 257), (3, 600)] {
            let w32 = values(n * k, seed);
            let w: Vec<u16> = w32.iter().map(|&v| to_bf16_bits(v)).collect();
            // The reference reads the weight as the f32 values the bf16 patterns stand for.
            let wide: Vec<f32> = w.iter().map(|&b| widened(b)).collect();
            for m in 1..=super::super::matvec::MAX_ROWS {
                seed += 1;
                let x = values(m * k, seed);
                let mut want = vec![0f32; m * n];
                reference_bf16_gemm(
                    (m, n, k),
                    &mut want,
                    (n, 1),
                    false,
                    &x,
                    (k, 1),
                    &wide,
                    (1, k),
                    1.0,
                );
                for &path in &paths {
                    let got = bf16_matmul_wt_slices_on(path, &x, &w, m, n, k);
                    assert_eq!(got.len(), m * n);
                    for i in 0..m {
                        for j in 0..n {
                            let magnitude: f32 = (0..k)
                                .map(|p| (round_to_bf16(x[i * k + p]) * wide[j * k + p]).abs())
                                .sum();
                            // Exact products; only the f32 sums round: a random walk of k
                            // roundings, with a wide margin.
                            let bound = 4.0 * f32::EPSILON * (k as f32).sqrt() * magnitude;
                            let (g, r) = (got[i * n + j], want[i * n + j]);
                            assert!(
                                (g - r).abs() <= bound,
                                "{path:?} m={m} n={n} k={k} [{i},{j}]: {g} vs reference {r} \
                                 (bound {bound})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The input rows are rounded to bf16 on every path, as the bf16 gemm rounds them: a value
    /// that bf16 cannot hold gives the product of its rounding, not of the f32 value.
    #[test]
    fn every_path_rounds_the_inputs_to_bf16() {
        let k = 40;
        let x = vec![1.0 + 2f32.powi(-12); k];
        let w = vec![to_bf16_bits(1.0); k];
        for path in all_paths() {
            let got = bf16_matmul_wt_slices_on(path, &x, &w, 1, 1, k);
            assert_eq!(got, vec![k as f32], "{path:?}");
        }
    }

    #[test]
    fn empty_shapes_give_empty_or_zero_products() {
        for path in all_paths() {
            assert!(bf16_matmul_wt_slices_on(path, &[], &[0; 6], 0, 3, 2).is_empty());
            assert!(bf16_matmul_wt_slices_on(path, &[1.0; 4], &[], 2, 0, 2).is_empty());
            assert_eq!(
                bf16_matmul_wt_slices_on(path, &[], &[], 2, 3, 0),
                vec![0.0; 6]
            );
        }
    }
}
