//! Recycled f32 buffers for the fused kernels' activations and gradients.
//!
//! A MiniLM training step (16 × 128 tokens) fills and frees about 600 MB of f32 buffers per step
//! whose every element a kernel then writes before anything reads it: gemm outputs, layer-norm
//! outputs, the attention probabilities and the other activations a layer keeps for its
//! backward. `vec![0.0; n]` zeroes each of them first, on one thread, which measured here as a
//! few percent of the step. Buffers handed back with [`recycle`] come out of [`overwritable`]
//! again with stale (but initialised) contents, so the step's working set is written only by the
//! kernels that fill it.

use std::sync::Mutex;

/// Buffers smaller than this (in floats) are not worth pooling: zeroing them is cheap.
const MIN_POOLED: usize = 1 << 16;
/// At most this many buffers wait in the pool; beyond it, returned buffers are freed.
const MAX_BUFFERS: usize = 128;
/// At most this many bytes wait in the pool (a 16 × 128 MiniLM step keeps ~360 MB of
/// activations between forward and backward; the pool holds them between steps).
const MAX_BYTES: usize = 1 << 30;

struct Pool {
    buffers: Vec<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    buffers: Vec::new(),
    bytes: 0,
});

/// A buffer of `len` floats with unspecified (stale) contents, for a caller that writes every
/// element before reading any: a recycled one when the pool holds one of a fitting size (at
/// least `len`, at most twice that), else a fresh zeroed one.
pub(crate) fn overwritable(len: usize) -> Vec<f32> {
    if len >= MIN_POOLED
        && let Ok(mut pool) = POOL.lock()
    {
        let best = pool
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len && b.len() <= 2 * len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let mut buf = pool.buffers.swap_remove(i);
            pool.bytes -= std::mem::size_of_val(&buf[..]);
            drop(pool);
            buf.truncate(len);
            return buf;
        }
    }
    vec![0f32; len]
}

/// Hands a buffer the caller no longer needs to the pool, for [`overwritable`] to give out again
/// (or frees it when it is small or the pool is full).
pub(crate) fn recycle(buf: Vec<f32>) {
    let bytes = std::mem::size_of_val(&buf[..]);
    if buf.len() < MIN_POOLED {
        return;
    }
    if let Ok(mut pool) = POOL.lock()
        && pool.buffers.len() < MAX_BUFFERS
        && pool.bytes + bytes <= MAX_BYTES
    {
        pool.bytes += bytes;
        pool.buffers.push(buf);
    }
}
