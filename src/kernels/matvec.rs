//! Decode-shaped matrix product `y[m, n] = x[m, k] · W[n, k]ᵀ` for a few input rows (m ≤
//! [`MAX_ROWS`]): what every linear layer and the LM head compute once per generated token.
//!
//! For such shapes candle's matmul (the `gemm` crate) packs the whole weight matrix into its
//! blocked layout on every call, which alone took ~45% of batch-1 decode time here. This kernel
//! instead streams the weights once, straight from the `[n, k]` layout they are stored in, one
//! row at a time: a single sequential stream per thread is what the hardware prefetcher follows
//! best, and a decode step is bound by memory bandwidth. Each weight row is dotted with up to
//! [`MR`] input rows at once (one SIMD accumulator per input row) while it is in registers and
//! L1. With several input rows the arithmetic is heavy enough that streaming and computing must
//! overlap, so the kernel also prefetches the weights 8 KB ahead. One pass over SmolLM2-135M's
//! weights at batch 8 (what `cargo bench --bench decode_kernels` times), alternated three
//! times here: 2 weight rows × 4 input rows per tile (two streams and two passes per row)
//! 39.7–49.2 ms best / 43.7–59.5 median; one row × 8 inputs 38.5–44.1 / 41.5–49.6.
//! The SIMD width is chosen at run time through `pulp` (AVX2+FMA on x86-64, NEON on aarch64,
//! scalar otherwise), so a binary built for the default x86-64 target (SSE2 only) still uses
//! the wide instructions; the one `unsafe` call is the prefetch hint. Output rows are split over
//! rayon's threads in chunks of weight rows; each thread writes its own `[rows, m]` block of
//! `yᵀ`, which is then transposed (a copy of m·n floats, tiny next to the n·k weights).
//!
//! The op has a backward (`dx = dy·W`, `dW = dyᵀ·x`, both ordinary matmuls), so routing a layer
//! through it never cuts a gradient.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::cpu::f32_slice;

/// Inputs with more rows than this go to the blocked gemm, which wins once packing the
/// weights is amortised over enough rows.
pub const MAX_ROWS: usize = 16;

/// Input rows per register tile: one weight row is dotted with up to this many input rows at
/// once, in as many SIMD accumulators.
pub(super) const MR: usize = 8;
/// How far ahead of the loads the weights are prefetched (floats: 8 KB) with several input rows.
const PREFETCH_FLOATS: usize = 2048;
/// Weight bytes a parallel task should cover at least: below ~256 KB (64 K floats) rayon's
/// hand-off costs more than the second core saves.
const MIN_TASK_BYTES: usize = 1 << 18;

/// The custom op; inputs `x` `[m, k]` and `w` `[n, k]`, both contiguous f32 on the CPU.
pub struct MatMulWt;

impl CustomOp2 for MatMulWt {
    fn name(&self) -> &'static str {
        "matmul-wt-small-m"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[m, k], &[n, kw]) = (lx.dims(), lw.dims()) else {
            bail!(
                "matmul-wt: expected x [m, k] and w [n, k], got {:?} and {:?}",
                lx.dims(),
                lw.dims()
            );
        };
        if k != kw {
            bail!("matmul-wt: x has {k} columns but w has {kw}");
        }
        let x = f32_slice(sx, lx, "matmul-wt")?;
        let w = f32_slice(sw, lw, "matmul-wt")?;
        Ok((
            CpuStorage::F32(matmul_wt_slices(x, w, m, n, k)),
            (m, n).into(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only inputs that are part of the graph get a gradient: a frozen base weight under a
        // LoRA adapter must not receive one (nor cost the product).
        let dx = x.track_op().then(|| dy.matmul(w)).transpose()?;
        let dw = w.track_op().then(|| dy.t()?.matmul(x)).transpose()?;
        Ok((dx, dw))
    }
}

/// `x[m, k] · w[n, k]ᵀ` as a row-major `[m, n]` vector. The slices must hold exactly `m·k` and
/// `n·k` floats (checked: a mismatch is a programming error of the caller).
pub fn matmul_wt_slices(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "matmul-wt: x is not {m}x{k}");
    assert_eq!(w.len(), n * k, "matmul-wt: w is not {n}x{k}");
    over_weight_rows(m, n, k * 4, |j0, rows, out| {
        matmul_wt_into(x, &w[j0 * k..(j0 + rows) * k], m, rows, k, out)
    })
}

/// The parallel frame of a streaming product `y[m, n] = x · wᵀ` whose weight rows are
/// `row_bytes` long: splits the `n` weight rows into tasks on rayon's pool, runs
/// `task(first_row, rows, yt)` on each (it writes `yt[j·m + i]` for its rows `j`, the product
/// transposed), and returns `y` row-major. Shared by the f32 kernel here and the bf16 one.
pub(super) fn over_weight_rows(
    m: usize,
    n: usize,
    row_bytes: usize,
    task: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let mut yt = vec![0f32; n * m];
    let rows_per_task = rows_per_task(n, row_bytes);
    if rows_per_task >= n {
        task(0, n, &mut yt);
    } else {
        yt.par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(chunk, out)| task(chunk * rows_per_task, out.len() / m, out));
    }
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + j] = v;
        }
    }
    y
}

/// `yt[j·m + i] = w[j] · x[i]` (the product transposed, `[n, m]`) on the calling thread, for
/// callers that parallelise at a coarser level.
pub fn matmul_wt_into(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, yt: &mut [f32]) {
    assert!(
        x.len() == m * k && w.len() == n * k && yt.len() == n * m,
        "matmul-wt: slices do not match m={m}, n={n}, k={k}"
    );
    if m == 0 || n == 0 {
        return;
    }
    if m == 1 {
        dispatch(WeightRows::<0> { x, w, m, k, yt });
    } else {
        dispatch(WeightRows::<PREFETCH_FLOATS> { x, w, m, k, yt });
    }
}

/// Runs `op` with the widest SIMD this CPU has. pulp's own `Arch` only knows AVX2 with its
/// `x86-v3` feature, which gemm-common leaves off (enabling it would rebuild gemm and candle), so
/// on x86-64 the AVX2+FMA level is detected here; elsewhere pulp's `Arch` picks (NEON, scalar).
#[inline(always)]
pub(super) fn dispatch<Op: WithSimd<Output = ()>>(op: Op) {
    #[cfg(target_arch = "x86_64")]
    {
        match pulp::x86::V3::try_new() {
            Some(simd) => Simd::vectorize(simd, op),
            None => Simd::vectorize(pulp::Scalar::new(), op),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    pulp::Arch::new().dispatch(op)
}

/// Weight rows per parallel task: about four tasks per thread (so a thread slowed by the other
/// processes on a shared machine does not hold the rest up), and never less than
/// [`MIN_TASK_BYTES`] of weights.
fn rows_per_task(n: usize, row_bytes: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = n.div_ceil(threads * 4);
    let by_size = MIN_TASK_BYTES.div_ceil(row_bytes.max(1));
    by_threads.max(by_size)
}

/// One task: `yt[j, i] = w[j] · x[i]` for the task's weight rows `j` and every input row `i`,
/// one weight row at a time (tiles of [`MR`], 4 and 1 input rows), prefetching `PF` floats
/// ahead of the weight loads (0: no prefetch).
struct WeightRows<'a, const PF: usize> {
    x: &'a [f32],
    w: &'a [f32],
    m: usize,
    k: usize,
    yt: &'a mut [f32],
}

impl<const PF: usize> WithSimd for WeightRows<'_, PF> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self { x, w, m, k, yt } = self;
        // Input rows i..i+R as an array, for a tile of R rows.
        fn rows<const R: usize>(x: &[f32], k: usize, i: usize) -> [&[f32]; R] {
            std::array::from_fn(|r| &x[(i + r) * k..(i + r + 1) * k])
        }
        for (wj, out) in w.chunks_exact(k).zip(yt.chunks_exact_mut(m)) {
            let mut i = 0;
            while i + MR <= m {
                out[i..i + MR].copy_from_slice(&dots::<S, MR, PF>(simd, rows(x, k, i), wj));
                i += MR;
            }
            if i + 4 <= m {
                out[i..i + 4].copy_from_slice(&dots::<S, 4, PF>(simd, rows(x, k, i), wj));
                i += 4;
            }
            while i < m {
                out[i] = dots::<S, 1, PF>(simd, rows(x, k, i), wj)[0];
                i += 1;
            }
        }
    }
}

/// Dot products of one weight row with `R` input rows (all of one length), accumulated in `R`
/// SIMD registers; the tail that does not fill a register is summed in scalar. With `PF > 0`
/// each step also prefetches the weights `PF` floats ahead (past the row's end that is the next
/// row, since rows are stored back to back).
#[inline(always)]
fn dots<S: Simd, const R: usize, const PF: usize>(simd: S, xs: [&[f32]; R], w: &[f32]) -> [f32; R] {
    let xv = xs.map(S::as_simd_f32s);
    let (wh, wt) = S::as_simd_f32s(w);
    let lanes = wh.len();
    let width = std::mem::size_of::<S::f32s>() / std::mem::size_of::<f32>();
    // Equal-length views let the compiler drop the bounds checks in the hot loop.
    let xh: [&[S::f32s]; R] = std::array::from_fn(|r| &xv[r].0[..lanes]);
    let mut acc = [simd.splat_f32s(0.0); R];
    for (p, &wp) in wh.iter().enumerate() {
        if PF > 0 {
            prefetch(w.as_ptr().wrapping_add(p * width + PF));
        }
        for (a, xr) in acc.iter_mut().zip(&xh) {
            *a = simd.mul_add_e_f32s(xr[p], wp, *a);
        }
    }
    std::array::from_fn(|r| {
        let tail: f32 = xv[r].1.iter().zip(wt).map(|(a, b)| a * b).sum();
        simd.reduce_sum_f32s(acc[r]) + tail
    })
}

/// Asks the CPU to start loading the cache line holding `addr` (a hint: no effect elsewhere).
#[inline(always)]
#[allow(unsafe_code)] // the kernels' only unsafe call; see SAFETY
pub(super) fn prefetch(addr: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 never faults and reads nothing into a register, whatever the address
    // (Intel SDM vol. 2, "PREFETCHh"), so any pointer, even one past the slice, is sound here;
    // SSE, which provides it, is part of the x86-64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Starts loading every cache line of `data`, for a block the caller will read soon.
pub(super) fn prefetch_all(data: &[f32]) {
    const LINE_FLOATS: usize = 16;
    for line in data.chunks(LINE_FLOATS) {
        prefetch(line.as_ptr());
    }
}

/// `x[m, k] · w[n, k]ᵀ` with the streaming kernel, recorded with its backward. Both must be
/// 2-D f32 CPU tensors; each is used in place when contiguous and copied otherwise.
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, MatMulWt)
}
