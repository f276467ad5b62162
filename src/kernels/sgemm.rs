//! A bounds-checked entry point to the `gemm` crate (the kernel candle itself uses), so the fused
//! ops can multiply strided views (heads inside `[b, t, heads·d]`, transposes) without copies:
//! single-threaded for the many small products inside attention, where the parallelism comes from
//! running independent rows of the batch on different threads, and on rayon's pool for the big
//! projection matmuls.

/// `dst = scale · lhs · rhs` (or `dst += …` when `accumulate`), for an `m×k` by `k×n` product
/// where every matrix is addressed as `base[i * row_stride + j * col_stride]`; single-threaded.
///
/// Panics if a stride pattern would read or write outside its slice, or if two `dst` elements
/// would share an address: these are programming errors of the caller, not input errors.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
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
    sgemm_threads(
        (m, n, k),
        dst,
        (dst_rs, dst_cs),
        accumulate,
        lhs,
        (lhs_rs, lhs_cs),
        rhs,
        (rhs_rs, rhs_cs),
        scale,
        1,
    )
}

/// [`sgemm`] on `threads` of rayon's threads (1: the calling thread only).
#[allow(clippy::too_many_arguments)]
#[allow(unsafe_code)]
pub fn sgemm_threads(
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
    if finished_without_multiplying(
        (m, n, k),
        dst,
        (dst_rs, dst_cs),
        accumulate,
        (lhs, (lhs_rs, lhs_cs)),
        (rhs, (rhs_rs, rhs_cs)),
    ) {
        return;
    }
    let s = |v: usize| v as isize;
    // SAFETY: `finished_without_multiplying` asserted that every address gemm reads (lhs, rhs)
    // or writes (dst) lies inside the borrowed slices, and that the dst addresses are distinct.
    // `dst` is borrowed mutably, so it cannot overlap `lhs`/`rhs`, and nothing outside gemm can
    // touch it while gemm runs (gemm's own worker threads write disjoint blocks of it).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            s(dst_cs),
            s(dst_rs),
            accumulate,
            lhs.as_ptr(),
            s(lhs_cs),
            s(lhs_rs),
            rhs.as_ptr(),
            s(rhs_cs),
            s(rhs_rs),
            1.0,
            scale,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// The checks every strided gemm entry point makes before touching memory, shared by [`sgemm_threads`]
/// and the bf16 kernel: panics if a stride pattern would read or write outside its slice or if two
/// `dst` elements would share an address (programming errors of the caller). Returns `true` when
/// the product is empty (`m`, `n` or `k` zero) and `dst` already holds the answer.
pub(super) fn finished_without_multiplying(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    (lhs, (lhs_rs, lhs_cs)): (&[f32], (usize, usize)),
    (rhs, (rhs_rs, rhs_cs)): (&[f32], (usize, usize)),
) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(m, n, dst_rs, dst_cs) < dst.len(),
        "sgemm: dst out of bounds"
    );
    assert!(
        dst_rs >= n * dst_cs || dst_cs >= m * dst_rs,
        "sgemm: dst strides ({dst_rs}, {dst_cs}) alias elements of an {m}x{n} matrix"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = 0.0;
                }
            }
        }
        return true;
    }
    assert!(
        last(m, k, lhs_rs, lhs_cs) < lhs.len(),
        "sgemm: lhs out of bounds"
    );
    assert!(
        last(k, n, rhs_rs, rhs_cs) < rhs.len(),
        "sgemm: rhs out of bounds"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_product_matches_naive_loops() {
        let (m, n, k) = (5, 3, 4);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        // rhs stored transposed (n×k row-major) and read through strides.
        let rhs_t: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut dst = vec![1.0f32; m * n];
        sgemm(
            (m, n, k),
            &mut dst,
            (n, 1),
            true,
            &lhs,
            (k, 1),
            &rhs_t,
            (1, k),
            2.0,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0
                    + 2.0
                        * (0..k)
                            .map(|p| lhs[i * k + p] * rhs_t[j * k + p])
                            .sum::<f32>();
                assert!((dst[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
