//! CPU plumbing shared by every kernel: borrowing a tensor's f32 data, and splitting rows of
//! work over rayon's pool (one splitter for all: [`par_rows`] for row-wise ops, [`rows_per_task`]
//! where a kernel zips several buffers).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use super::isa::multiversion;

/// The contiguous f32 data a layout addresses.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{op}: expected f32 data, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input is not contiguous (shape {:?})", l.dims()),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor (copying only if it is strided).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(f32_slice(cpu, layout, "fused op")?),
        _ => bail!("fused op: tensor is not on the CPU"),
    }
}

/// Runs `work` on one of rayon's worker threads and returns its result.
///
/// The kernels here (and candle's matmul) split their work over rayon's pool. Called from a thread
/// outside the pool, every split is handed over through a lock and the caller is woken through a
/// condition variable when it ends, while the pool's idle workers spin: three threads on a 2-core
/// machine, hundreds of hand-overs per generated token. Called from a worker, a split is a `join`
/// whose other half the second worker steals. Measured here on the decode matrix products of
/// SmolLM2-135M: 6–10% less time per token. Already on a worker, `work` simply runs; so does it
/// inside [`super::with_gpu_path`], whose switch belongs to the calling thread (set on a worker,
/// it would also reach whatever other work that worker picks up while it waits).
pub fn on_worker<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() || super::gpu_path_forced() {
        work()
    } else {
        rayon::join(work, || ()).0
    }
}

/// Rows per rayon task: enough work per task (~16K elements) to amortise scheduling.
pub(crate) fn rows_per_task(n: usize) -> usize {
    (16_384 / n.max(1)).max(1)
}

/// Adds the per-task partial column sums.
pub(crate) fn add_into(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    for (x, y) in a.iter_mut().zip(&b) {
        *x += y;
    }
    a
}

pub(crate) fn last_dim(layout: &Layout, op: &str) -> Result<usize> {
    match layout.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => bail!(
            "{op}: input needs a non-empty last dimension, got shape {:?}",
            layout.dims()
        ),
    }
}

pub(crate) fn check_vector(layout: &Layout, n: usize, op: &str, what: &str) -> Result<()> {
    if layout.dims() != [n] {
        bail!(
            "{op}: {what} must have shape [{n}], got {:?}",
            layout.dims()
        );
    }
    Ok(())
}

/// Column sums of a row-major `[rows, n]` slice.
pub(crate) fn col_sums(g: &[f32], n: usize) -> Vec<f32> {
    g.par_chunks(n * rows_per_task(n))
        .map(|c| block_col_sums(c, n))
        .reduce(|| vec![0f32; n], add_into)
}

multiversion! {
    /// [`col_sums`] of one block of rows.
    fn block_col_sums(c: &[f32], n: usize) -> Vec<f32> {
        let mut acc = vec![0f32; n];
        for row in c.chunks_exact(n) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        acc
    }
}

/// `f(x + b)` for every element, `b` broadcast over the rows of `x`: the forward pass that
/// [`BiasAdd`] and [`BiasGelu`] share. Checks the shapes and returns the new storage.
pub(crate) fn bias_map(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<(CpuStorage, Shape)> {
    let n = last_dim(l1, op)?;
    check_vector(l2, n, op, "bias")?;
    let x = f32_slice(s1, l1, op)?;
    let b = f32_slice(s2, l2, op)?;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n * rows_per_task(n))
        .zip(x.par_chunks(n * rows_per_task(n)))
        .for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                for ((o, x), b) in orow.iter_mut().zip(xrow).zip(b) {
                    *o = f(x + b);
                }
            }
        });
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

/// Splits `out` (rows of `width` values) into blocks of whole rows and runs
/// `f(first_row, block)` on each, in parallel on rayon's pool.
///
/// Outputs under [`PAR_MIN_FLOATS`] run on the calling thread: a decode step normalises and
/// soft-maxes a few hundred floats per call, sixty times per token, where waking another thread
/// costs more than the work. Larger ones are split into one block per rayon thread. (The thread
/// count comes from rayon, not `candle_core::utils::get_num_threads`, which re-reads
/// `/proc/cpuinfo` on every call unless `RAYON_NUM_THREADS` is set: ~80 µs here.)
pub(crate) fn par_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / width.max(1);
    let threads = if out.len() < PAR_MIN_FLOATS {
        1
    } else {
        rayon::current_num_threads().clamp(1, rows.max(1))
    };
    let per = rows.div_ceil(threads).max(1);
    if threads == 1 {
        f(0, out);
        return;
    }
    out.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(i, block)| f(i * per, block));
}

/// Smallest output (in floats) that [`par_rows`] splits over threads.
const PAR_MIN_FLOATS: usize = 1 << 14;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::testing::{every_isa_agrees, values};

    #[test]
    fn column_sums_agree_on_every_instruction_set() {
        let g = values(7 * 37, 10, 2.0);
        every_isa_agrees("column sums", 1e-6, |isa| block_col_sums_on(isa, &g, 37));
    }
}
