//! A gemm with bf16 inputs and f32 accumulation for CPUs with AVX512_BF16, the same contract as
//! [`super::sgemm::sgemm_threads`]: `dst (+)= scale · lhs · rhs` over strided f32 matrices.
//!
//! Why: `vdpbf16ps` multiplies pairs of bf16 values and adds both products into an f32 lane, so
//! one instruction does twice the multiply-adds of an f32 FMA. The inputs are rounded to bf16
//! (round to nearest even, as `vcvtne2ps2bf16` does: denormals become signed zero), the
//! products of two bf16 values are exact in f32, and only the accumulation rounds. This is what
//! PyTorch's CPU bf16 autocast does through oneDNN. [`reference_bf16_gemm`] is the scalar twin.
//!
//! Layout: A is packed into row panels of [`MR`] rows and B into column panels of [`NR`]
//! columns, both as consecutive k-pairs (one `u32` = two bf16, the even k in the low half) and
//! zero-padded at the edges; a micro-kernel keeps an `MR × NR` tile in 24 zmm accumulators and
//! walks a cache block of [`KC`] k-pairs, with the B micro-panel (`KC × NR` pairs, 12 KiB) in L1.
//! Rows are split into tasks of [`MC`] rows on rayon's pool; each task packs its own A rows.

// The kernel is `std::arch` intrinsics behind a runtime feature check; every unsafe block says
// which bound it relies on.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

/// Rows of the micro-kernel's tile.
const MR: usize = 8;
/// Columns of the micro-kernel's tile: three zmm of 16 f32 lanes.
const NR: usize = 48;
/// k-pairs per cache block (128 values of k).
const KC: usize = 64;
/// Rows per parallel task (a multiple of `MR`).
const MC: usize = 64;

/// Whether this CPU can run [`bf16_gemm_threads`] (AVX-512 F/BW and AVX512_BF16).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bf16 bit pattern the CPU's conversion gives for `x`: round to nearest even, denormal
/// inputs to signed zero, NaN to a quiet NaN (Intel's `convert_fp32_to_bfloat16`).
pub fn to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7f80_0000 == 0 {
        return ((bits >> 16) & 0x8000) as u16;
    }
    if x.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// `x` rounded to bf16, as an f32.
pub fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(to_bf16_bits(x)) << 16)
}

/// Two values of k as one packed pair: the even one in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(to_bf16_bits(lo)) | (u32::from(to_bf16_bits(hi)) << 16)
}

/// The scalar twin of [`bf16_gemm_threads`]: operands rounded with [`round_to_bf16`], products
/// summed in f64, then `dst = (dst if accumulate) + scale · sum`. The fused kernel differs from
/// it only by its f32 accumulation order.
#[allow(clippy::too_many_arguments)]
pub fn reference_bf16_gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    scale: f32,
) {
    for i in 0..m {
        for j in 0..n {
            let sum: f64 = (0..k)
                .map(|p| {
                    let a = round_to_bf16(lhs[i * lhs_rs + p * lhs_cs]);
                    let b = round_to_bf16(rhs[p * rhs_rs + j * rhs_cs]);
                    f64::from(a) * f64::from(b)
                })
                .sum();
            let out = &mut dst[i * dst_rs + j * dst_cs];
            let old = if accumulate { f64::from(*out) } else { 0.0 };
            *out = (old + f64::from(scale) * sum) as f32;
        }
    }
}

/// `dst = scale · lhs · rhs` (or `dst += …` when `accumulate`) with bf16 inputs and f32
/// accumulation, for an `m×k` by `k×n` product where every matrix is addressed as
/// `base[i * row_stride + j * col_stride]`, on `threads` of rayon's threads (1: the calling
/// thread only).
///
/// Panics as [`super::sgemm::sgemm_threads`] does on strides outside the slices, and if the CPU
/// lacks AVX512_BF16 ([`supported`]): callers choose this kernel through
/// [`super::precision`], which refuses bf16 on such a CPU.
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemm_threads(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    scale: f32,
    threads: usize,
) {
    assert!(
        supported(),
        "bf16 gemm called on a CPU without AVX512_BF16 (kernels::precision should have refused)"
    );
    if super::sgemm::finished_without_multiplying(
        (m, n, k),
        dst,
        (dst_rs, dst_cs),
        accumulate,
        (lhs, (lhs_rs, lhs_cs)),
        (rhs, (rhs_rs, rhs_cs)),
    ) {
        return;
    }
    if dst_cs != 1 || dst_rs < n {
        // The micro-kernel writes rows of contiguous columns; any other destination (a
        // transposed view) gets a row-major product first.
        let mut tmp = vec![0f32; m * n];
        bf16_gemm_threads(
            (m, n, k),
            &mut tmp,
            (n, 1),
            false,
            lhs,
            (lhs_rs, lhs_cs),
            rhs,
            (rhs_rs, rhs_cs),
            scale,
            threads,
        );
        for i in 0..m {
            for j in 0..n {
                let out = &mut dst[i * dst_rs + j * dst_cs];
                *out = if accumulate {
                    *out + tmp[i * n + j]
                } else {
                    tmp[i * n + j]
                };
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let shape = Shape {
            n,
            k,
            kp: k.div_ceil(2),
        };
        let b_packed = pack_b(&shape, rhs, (rhs_rs, rhs_cs), threads);
        multiply_packed(
            &shape,
            m,
            (dst, dst_rs),
            accumulate,
            (lhs, (lhs_rs, lhs_cs)),
            &b_packed,
            scale,
            threads,
        );
    }
}

/// `dst = lhs · rhs` for a row-major `m×n` `dst`, where `rhs` is already bf16 (bit patterns, as
/// candle's `bf16` tensors hold them) at strides `(rhs_rs, rhs_cs)`: a frozen weight stored in
/// bf16 is packed as it is, with no f32 copy. Same accumulation as [`bf16_gemm_threads`].
///
/// Panics if the CPU lacks AVX512_BF16 ([`supported`]) or on strides outside the slices.
pub fn bf16_gemm_bf16_rhs_threads(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: (&[f32], (usize, usize)),
    rhs: (&[u16], (usize, usize)),
    threads: usize,
) {
    assert!(
        supported(),
        "bf16 gemm called on a CPU without AVX512_BF16 (callers check `supported` first)"
    );
    assert!(
        dst.len() >= m * n,
        "bf16 gemm: dst holds fewer than m·n values"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let shape = Shape {
            n,
            k,
            kp: k.div_ceil(2),
        };
        let b_packed = pack_b_bf16(&shape, rhs.0, rhs.1, threads);
        multiply_packed(&shape, m, (dst, n), false, lhs, &b_packed, 1.0, threads);
    }
}

/// Splits the rows of `dst` (row stride `dst_rs`, contiguous columns) into tasks of [`MC`] rows
/// that each pack their A rows and multiply them by the packed B.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn multiply_packed(
    shape: &Shape,
    m: usize,
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    (lhs, (lhs_rs, lhs_cs)): (&[f32], (usize, usize)),
    b_packed: &[u32],
    scale: f32,
    threads: usize,
) {
    let task = |(t, rows_dst): (usize, &mut [f32])| {
        let row0 = t * MC;
        if row0 < m {
            let rows = MC.min(m - row0);
            let a = StridedSource {
                data: lhs,
                lane_stride: lhs_rs,
                k_stride: lhs_cs,
                lane0: row0,
            };
            multiply_rows(
                shape, &a, rows, b_packed, rows_dst, dst_rs, accumulate, scale,
            );
        }
    };
    // Each task owns MC whole rows of dst: with dst_cs = 1 and dst_rs ≥ n a row's n
    // elements lie inside its chunk.
    let chunk = MC * dst_rs;
    if threads > 1 {
        dst.par_chunks_mut(chunk).enumerate().for_each(task);
    } else {
        dst.chunks_mut(chunk).enumerate().for_each(task);
    }
}

/// The product's dimensions, with `kp` pairs of k (the last one zero-padded when k is odd).
#[cfg(target_arch = "x86_64")]
struct Shape {
    n: usize,
    k: usize,
    kp: usize,
}

/// A strided f32 operand seen as lanes (A's rows or B's columns) along k, starting at `lane0`:
/// element (lane, kk) is `data[(lane0 + lane) * lane_stride + kk * k_stride]`.
#[cfg(target_arch = "x86_64")]
struct StridedSource<'a> {
    data: &'a [f32],
    lane_stride: usize,
    k_stride: usize,
    lane0: usize,
}

/// B packed as column panels `[panel][kp][NR]`, the panels filled in parallel.
#[cfg(target_arch = "x86_64")]
fn pack_b(s: &Shape, rhs: &[f32], (rs, cs): (usize, usize), threads: usize) -> Vec<u32> {
    let panel_len = s.kp * NR;
    let mut packed = vec![0u32; s.n.div_ceil(NR) * panel_len];
    let fill = |(jp, panel): (usize, &mut [u32])| {
        let src = StridedSource {
            data: rhs,
            lane_stride: cs,
            k_stride: rs,
            lane0: jp * NR,
        };
        pack_panel(panel, &src, NR, NR.min(s.n - jp * NR), s.k);
    };
    if threads > 1 {
        packed.par_chunks_mut(panel_len).enumerate().for_each(fill);
    } else {
        packed.chunks_mut(panel_len).enumerate().for_each(fill);
    }
    packed
}

/// B packed as [`pack_b`] packs it, from bf16 bit patterns: each pair is two stored values, so
/// packing only moves them.
#[cfg(target_arch = "x86_64")]
fn pack_b_bf16(s: &Shape, rhs: &[u16], (rs, cs): (usize, usize), threads: usize) -> Vec<u32> {
    let panel_len = s.kp * NR;
    let mut packed = vec![0u32; s.n.div_ceil(NR) * panel_len];
    let at = |kk: usize, j: usize| -> u32 {
        if kk < s.k {
            u32::from(rhs[kk * rs + j * cs])
        } else {
            0
        }
    };
    let fill = |(jp, panel): (usize, &mut [u32])| {
        let lanes = NR.min(s.n - jp * NR);
        // Walk the source in its memory order: along k when k is contiguous (a weight used
        // transposed), along the lanes otherwise.
        if rs == 1 {
            for lane in 0..lanes {
                let j = jp * NR + lane;
                for p in 0..s.kp {
                    panel[p * NR + lane] = at(2 * p, j) | (at(2 * p + 1, j) << 16);
                }
            }
        } else {
            for p in 0..s.kp {
                for lane in 0..lanes {
                    let j = jp * NR + lane;
                    panel[p * NR + lane] = at(2 * p, j) | (at(2 * p + 1, j) << 16);
                }
            }
        }
    };
    if threads > 1 {
        packed.par_chunks_mut(panel_len).enumerate().for_each(fill);
    } else {
        packed.chunks_mut(panel_len).enumerate().for_each(fill);
    }
    packed
}

/// Fills `panel[p * width + lane]` with the pair (k = 2p, 2p + 1) of each of `lanes` lanes; the
/// rest of the panel stays as it was (zero).
#[cfg(target_arch = "x86_64")]
fn pack_panel(panel: &mut [u32], src: &StridedSource, width: usize, lanes: usize, k: usize) {
    debug_assert!(panel.len() >= k.div_ceil(2) * width && lanes <= width);
    if src.k_stride == 1 {
        // SAFETY: `supported()` was asserted by the entry point, and `lane_of_pairs` reads k
        // consecutive values from each lane's start, which the entry point's bounds checks cover.
        for lane in 0..lanes {
            let start = (src.lane0 + lane) * src.lane_stride;
            unsafe { lane_of_pairs(panel, width, lane, &src.data[start..start + k]) };
        }
    } else if src.lane_stride == 1 {
        for p in 0..k / 2 {
            let even = &src.data[2 * p * src.k_stride + src.lane0..][..lanes];
            let odd = &src.data[(2 * p + 1) * src.k_stride + src.lane0..][..lanes];
            // SAFETY: as above; the two rows are slices of exactly `lanes` values.
            unsafe { row_of_pairs(&mut panel[p * width..p * width + lanes], even, odd) };
        }
        if k % 2 == 1 {
            let p = k / 2;
            let even = &src.data[2 * p * src.k_stride + src.lane0..][..lanes];
            for (slot, &x) in panel[p * width..p * width + lanes].iter_mut().zip(even) {
                *slot = pair(x, 0.0);
            }
        }
    } else {
        for lane in 0..lanes {
            let at = |kk: usize| src.data[(src.lane0 + lane) * src.lane_stride + kk * src.k_stride];
            for p in 0..k.div_ceil(2) {
                let hi = if 2 * p + 1 < k { at(2 * p + 1) } else { 0.0 };
                panel[p * width + lane] = pair(at(2 * p), hi);
            }
        }
    }
}

/// One lane whose k values are consecutive (`values`): 32 at a time through
/// `vcvtne2ps2bf16`, whose 32 bf16 results in memory order are already 16 pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn lane_of_pairs(panel: &mut [u32], width: usize, lane: usize, values: &[f32]) {
    use std::arch::x86_64::*;
    let whole = values.len() / 32;
    let mut pairs = [0u32; 16];
    for block in 0..whole {
        // SAFETY: 32 values from `block * 32` lie inside `values`; `pairs` holds 16 u32.
        unsafe {
            let lo = _mm512_loadu_ps(values.as_ptr().add(block * 32));
            let hi = _mm512_loadu_ps(values.as_ptr().add(block * 32 + 16));
            let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_epi32(pairs.as_mut_ptr().cast(), bf);
        }
        for (q, &v) in pairs.iter().enumerate() {
            panel[(block * 16 + q) * width + lane] = v;
        }
    }
    let rest = &values[whole * 32..];
    for (q, two) in rest.chunks(2).enumerate() {
        let hi = two.get(1).copied().unwrap_or(0.0);
        panel[(whole * 16 + q) * width + lane] = pair(two[0], hi);
    }
}

/// The pairs of many lanes whose values at k = 2p (`even`) and 2p + 1 (`odd`) are consecutive,
/// into `out` (one u32 per lane): 16 lanes at a time, converted together and interleaved.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn row_of_pairs(out: &mut [u32], even: &[f32], odd: &[f32]) {
    use std::arch::x86_64::*;
    // After conversion lanes 0..16 hold `even` and 16..32 hold `odd`; pair i takes 16-bit words
    // i and 16 + i.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for start in (0..out.len()).step_by(16) {
        let count = 16.min(out.len() - start);
        let mask: __mmask16 = if count == 16 {
            u16::MAX
        } else {
            (1u16 << count) - 1
        };
        // SAFETY: the masked loads and store touch only the `count` lanes from `start`, which
        // lie inside `even`, `odd` and `out` (all `out.len()` long).
        unsafe {
            let e = _mm512_maskz_loadu_ps(mask, even.as_ptr().add(start));
            let o = _mm512_maskz_loadu_ps(mask, odd.as_ptr().add(start));
            let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(o, e));
            let pairs = _mm512_permutexvar_epi16(interleave, bf);
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(start).cast(), mask, pairs);
        }
    }
}

/// One task: packs its `rows` rows of A, then walks the cache blocks of k, B's column panels and
/// its row panels, the micro-kernel updating `dst` (row-major with row stride `ldc`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn multiply_rows(
    s: &Shape,
    a: &StridedSource,
    rows: usize,
    b_packed: &[u32],
    dst: &mut [f32],
    ldc: usize,
    accumulate: bool,
    scale: f32,
) {
    let row_panels = rows.div_ceil(MR);
    let panel_len = s.kp * MR;
    let mut a_packed = vec![0u32; row_panels * panel_len];
    for (ip, panel) in a_packed.chunks_mut(panel_len).enumerate() {
        let src = StridedSource {
            lane0: a.lane0 + ip * MR,
            ..*a
        };
        pack_panel(panel, &src, MR, MR.min(rows - ip * MR), s.k);
    }
    for pc in (0..s.kp).step_by(KC) {
        let kc = KC.min(s.kp - pc);
        let load = accumulate || pc > 0;
        for jp in 0..s.n.div_ceil(NR) {
            let b = &b_packed[(jp * s.kp + pc) * NR..][..kc * NR];
            let cols = NR.min(s.n - jp * NR);
            for ip in 0..row_panels {
                let a = &a_packed[(ip * s.kp + pc) * MR..][..kc * MR];
                let tile_rows = MR.min(rows - ip * MR);
                let c = &mut dst[ip * MR * ldc + jp * NR..];
                assert!((tile_rows - 1) * ldc + cols <= c.len());
                let tile = Tile {
                    rows: tile_rows,
                    cols,
                    ldc,
                    load,
                    scale,
                };
                // SAFETY: `supported()` was asserted by the entry point; the micro-kernel reads
                // `kc` pairs of `a` and `b` (their exact lengths) and writes `tile_rows` rows of
                // `cols` values at stride `ldc` inside `c` (asserted just above).
                unsafe { micro_kernel(a, b, kc, c, &tile) };
            }
        }
    }
}

/// Where one micro-kernel call writes: `rows × cols` of `dst` at row stride `ldc`, adding to
/// what is there when `load`, scaled by `scale`.
#[cfg(target_arch = "x86_64")]
struct Tile {
    rows: usize,
    cols: usize,
    ldc: usize,
    load: bool,
    scale: f32,
}

/// `c (+)= scale · a · b` for one `MR × NR` tile over `kc` k-pairs: per pair, three zmm of B
/// and a broadcast pair of each A row feed 24 `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn micro_kernel(a: &[u32], b: &[u32], kc: usize, c: &mut [f32], tile: &Tile) {
    use std::arch::x86_64::*;
    const NV: usize = NR / 16;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for p in 0..kc {
        // SAFETY: `b` holds `kc * NR` pairs and `a` `kc * MR` (the caller's slices).
        unsafe {
            let bp = b.as_ptr().add(p * NR);
            let bv: [__m512bh; NV] = std::array::from_fn(|v| {
                std::mem::transmute(_mm512_loadu_epi32(bp.add(v * 16).cast()))
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let pair = *a.as_ptr().add(p * MR + r);
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                for (lane, bvec) in row.iter_mut().zip(bv) {
                    *lane = _mm512_dpbf16_ps(*lane, av, bvec);
                }
            }
        }
    }
    let scale = _mm512_set1_ps(tile.scale);
    for (r, row) in acc.iter().enumerate().take(tile.rows) {
        for (v, &sum) in row.iter().enumerate() {
            let col0 = v * 16;
            if col0 >= tile.cols {
                break;
            }
            let count = 16.min(tile.cols - col0);
            let mask: __mmask16 = if count == 16 {
                u16::MAX
            } else {
                (1u16 << count) - 1
            };
            // SAFETY: the caller checked that `rows` rows of `cols` values at stride `ldc` lie
            // inside `c`; the masked load and store touch only those.
            unsafe {
                let ptr = c.as_mut_ptr().add(r * tile.ldc + col0);
                let old = if tile.load {
                    _mm512_maskz_loadu_ps(mask, ptr)
                } else {
                    _mm512_setzero_ps()
                };
                _mm512_mask_storeu_ps(ptr, mask, _mm512_fmadd_ps(sum, scale, old));
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::sgemm::sgemm_threads;

    /// Deterministic values in [-1, 1) from a seed (no RNG crate needed).
    pub(crate) fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn skip_without_bf16() -> bool {
        if supported() {
            return false;
        }
        eprintln!("note: this CPU lacks AVX512_BF16; the bf16 gemm test is skipped");
        true
    }

    /// One operand layout: row-major or transposed (column-major), with padding between rows.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        RowMajor,
        Transposed,
        Padded,
    }

    impl Layout {
        /// (len, row stride, col stride) for a `rows × cols` matrix.
        fn strides(self, rows: usize, cols: usize) -> (usize, usize, usize) {
            match self {
                Layout::RowMajor => (rows * cols, cols, 1),
                Layout::Transposed => (rows * cols, 1, rows),
                Layout::Padded => (rows * (cols + 3), cols + 3, 1),
            }
        }
    }

    struct Case {
        shape: (usize, usize, usize),
        layouts: [Layout; 3],
        accumulate: bool,
        scale: f32,
        threads: usize,
    }

    /// Runs the fused kernel, the scalar twin and f32 sgemm on one case and checks that the
    /// kernel is the twin up to f32 accumulation order, and f32 up to bf16 rounding.
    fn check(case: &Case, seed: u64) {
        let (m, n, k) = case.shape;
        let [ld, ll, lr] = case.layouts;
        let (dlen, drs, dcs) = ld.strides(m, n);
        let (alen, ars, acs) = ll.strides(m, k);
        let (blen, brs, bcs) = lr.strides(k, n);
        let a = values(alen, seed);
        let b = values(blen, seed + 1);
        let start = values(dlen, seed + 2);
        let run = |f: &dyn Fn(&mut [f32])| {
            let mut d = start.clone();
            f(&mut d);
            d
        };
        let args = (case.accumulate, case.scale);
        let ours = run(&|d| {
            bf16_gemm_threads(
                (m, n, k),
                d,
                (drs, dcs),
                args.0,
                &a,
                (ars, acs),
                &b,
                (brs, bcs),
                args.1,
                case.threads,
            )
        });
        let twin = run(&|d| {
            reference_bf16_gemm(
                (m, n, k),
                d,
                (drs, dcs),
                args.0,
                &a,
                (ars, acs),
                &b,
                (brs, bcs),
                args.1,
            )
        });
        let f32_product = run(&|d| {
            sgemm_threads(
                (m, n, k),
                d,
                (drs, dcs),
                args.0,
                &a,
                (ars, acs),
                &b,
                (brs, bcs),
                args.1,
                1,
            )
        });
        let mut differs_from_f32 = false;
        for i in 0..m {
            for j in 0..n {
                let at = i * drs + j * dcs;
                let magnitude: f32 = (0..k)
                    .map(|p| (a[i * ars + p * acs] * b[p * brs + j * bcs]).abs())
                    .sum::<f32>()
                    * case.scale.abs();
                let old = if case.accumulate {
                    start[at].abs()
                } else {
                    0.0
                };
                // f32 accumulation: a random walk of k roundings, with a wide margin.
                let order_bound =
                    8.0 * f32::EPSILON * (k as f32).sqrt() * magnitude + f32::EPSILON * old;
                let (got, want) = (ours[at], twin[at]);
                assert!(
                    (got - want).abs() <= order_bound,
                    "{m}x{n}x{k} {:?} acc={} scale={}: [{i},{j}] = {got}, twin {want}",
                    case.layouts,
                    case.accumulate,
                    case.scale
                );
                // Each operand is off by at most 2⁻⁹ relative, each product by ~2⁻⁸.
                let bf16_bound = 2.0 * 2f32.powi(-8) * magnitude + order_bound;
                assert!((got - f32_product[at]).abs() <= bf16_bound);
                differs_from_f32 |= got != f32_product[at];
            }
        }
        assert!(
            differs_from_f32 || k == 0,
            "{m}x{n}x{k}: no rounding to bf16 visible"
        );
        // Elements of dst outside the matrix (row padding) are untouched.
        if matches!(ld, Layout::Padded) {
            for i in 0..m {
                for j in n..drs {
                    assert_eq!(ours[i * drs + j], start[i * drs + j]);
                }
            }
        }
    }

    #[test]
    fn matches_its_scalar_twin_and_f32_on_every_layout_and_edge() {
        if skip_without_bf16() {
            return;
        }
        use Layout::*;
        let shapes = [
            (1, 1, 1),
            (7, 5, 3),
            (8, 48, 64),
            (9, 49, 129),
            (33, 100, 257),
            (130, 50, 300),
            (65, 97, 31),
        ];
        let layouts = [
            [RowMajor, RowMajor, RowMajor],
            [RowMajor, RowMajor, Transposed],
            [RowMajor, Transposed, RowMajor],
            [Padded, Padded, Padded],
            [Transposed, Transposed, Transposed],
        ];
        let mut seed = 1;
        for &shape in &shapes {
            for &layouts in &layouts {
                for (accumulate, scale, threads) in
                    [(false, 1.0, 1), (true, -0.5, 2), (true, 1.0, 1)]
                {
                    let case = Case {
                        shape,
                        layouts,
                        accumulate,
                        scale,
                        threads,
                    };
                    check(&case, seed);
                    seed += 3;
                }
            }
        }
    }

    #[test]
    fn rounds_like_the_cpu_conversion() {
        // Ties go to even; halfway above the even value rounds up.
        assert_eq!(to_bf16_bits(1.0), 0x3f80);
        assert_eq!(to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        // Denormals flush to a signed zero; NaN stays NaN; overflow rounds to infinity.
        assert_eq!(to_bf16_bits(-f32::from_bits(1)), 0x8000);
        assert!(round_to_bf16(f32::NAN).is_nan());
        assert_eq!(round_to_bf16(f32::MAX), f32::INFINITY);
    }

    #[test]
    fn empty_inner_dimension_clears_or_keeps_dst() {
        if skip_without_bf16() {
            return;
        }
        let mut dst = vec![3.0f32; 6];
        bf16_gemm_threads(
            (2, 3, 0),
            &mut dst,
            (3, 1),
            true,
            &[],
            (0, 1),
            &[],
            (3, 1),
            1.0,
            1,
        );
        assert_eq!(dst, vec![3.0; 6]);
        bf16_gemm_threads(
            (2, 3, 0),
            &mut dst,
            (3, 1),
            false,
            &[],
            (0, 1),
            &[],
            (3, 1),
            1.0,
            1,
        );
        assert_eq!(dst, vec![0.0; 6]);
    }
}
