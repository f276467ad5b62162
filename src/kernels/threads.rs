//! The compute threads: their floating-point mode (subnormal numbers flushed to zero), and one
//! pool of them (rayon's) rather than two.
//!
//! On Intel cores every multiply or FMA that reads or produces a subnormal float takes a
//! microcode assist (~100× the normal cost); AMD's Zen cores do not pay it. Padded attention
//! rows, GELU tails and tiny gradients make subnormals by the million, and a profile of a padded
//! length-256 reward run on a Xeon had 95% of its samples in the attention backward's gemm calls,
//! minutes per step. The kernels avoid making them ([`super::math::exp`] never returns one), and
//! the threads that run them — rayon's pool (gemm and candle's own kernels), the async runtime's
//! threads and the main thread — run with FTZ and DAZ set, so a subnormal that still appears
//! costs nothing. Values below 1.2e-38 become 0: far under anything training can resolve.
//! candle's own element-wise pool is kept to the calling thread (see
//! [`one_candle_elementwise_thread`]).

/// Sets flush-to-zero and denormals-are-zero for the calling thread (x86-64 SSE/AVX state;
/// elsewhere nothing changes). Returns whether the mode is now set.
#[allow(unsafe_code, deprecated)]
pub fn flush_denormals_on_this_thread() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        const FTZ: u32 = 1 << 15;
        const DAZ: u32 = 1 << 6;
        // SAFETY: MXCSR only holds this thread's SSE rounding, exception-mask and flush flags;
        // setting FTZ and DAZ (supported by every x86-64 CPU with SSE3, checked by `cpuid` in
        // the kernel's own feature list) changes results only for values below f32/f64's
        // normal range and cannot fault.
        unsafe { _mm_setcsr(_mm_getcsr() | FTZ | DAZ) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Builds rayon's global pool (the one gemm and candle's CPU kernels run on) with every worker
/// flushing subnormals, and sets the same mode on the calling thread. `threads: None` keeps
/// rayon's own choice (`RAYON_NUM_THREADS`, else one per CPU). An error means the global pool
/// was already built (by an earlier call, or by a parallel op that ran first).
///
/// Also keeps candle's second thread pool from starting (see [`CANDLE_ELEMENTWISE_THREADS`]).
/// It changes the process environment, so call it at start-up, before any other thread exists.
pub fn init_compute_threads(threads: Option<usize>) -> Result<(), rayon::ThreadPoolBuildError> {
    one_candle_elementwise_thread();
    flush_denormals_on_this_thread();
    let mut builder = rayon::ThreadPoolBuilder::new().start_handler(|_| {
        flush_denormals_on_this_thread();
    });
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    builder.build_global()
}

/// The variable candle 0.11 reads, once, to size the pool it runs large element-wise ops on
/// (`CANDLE_NUM_THREADS`; default: one thread per CPU).
const CANDLE_ELEMENTWISE_THREADS: &str = "CANDLE_NUM_THREADS";

/// Sets [`CANDLE_ELEMENTWISE_THREADS`] to 1 unless the user set it.
///
/// candle 0.11 runs element-wise ops over 64K elements (the gradient sums of its backward pass,
/// mostly) on a barrier pool of its own, beside rayon's: one more thread per CPU but one, each
/// spinning ~25,000 pause loops (~0.5 ms) after every op. On a 2-core machine that spinning
/// thread competes with rayon's two workers for the cores through the gemm calls that follow,
/// and the caller spins too while it waits for it. Measured on the MiniLM reward step
/// (`cargo bench --bench bert_step`, 2 threads, alternated runs): 11% less CPU time per step
/// with one element-wise thread (the caller's own) than with candle's default.
#[allow(unsafe_code)]
fn one_candle_elementwise_thread() {
    if std::env::var_os(CANDLE_ELEMENTWISE_THREADS).is_none() {
        // SAFETY: `init_compute_threads` is documented to run at start-up before other threads
        // exist (the binary calls it first thing in `main`, the benches likewise), so nothing
        // reads or writes the environment concurrently.
        unsafe { std::env::set_var(CANDLE_ELEMENTWISE_THREADS, "1") };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_flushing_thread_computes_zero_instead_of_subnormals() {
        let tiny = std::hint::black_box(1.0e-30f32);
        let small = std::hint::black_box(1.0e-10f32);
        // A fresh thread, so the test runner's threads keep the default mode.
        let (before, after) = std::thread::spawn(move || {
            let before = tiny * small;
            assert!(flush_denormals_on_this_thread());
            (
                before,
                std::hint::black_box(tiny) * std::hint::black_box(small),
            )
        })
        .join()
        .unwrap();
        assert!(before > 0.0 && !before.is_normal(), "{before:e}");
        assert_eq!(after, 0.0);
        // DAZ: a subnormal input reads as zero.
        let sub = std::hint::black_box(before);
        let read = std::thread::spawn(move || {
            flush_denormals_on_this_thread();
            sub * std::hint::black_box(1.0e30f32)
        })
        .join()
        .unwrap();
        assert_eq!(read, 0.0);
    }
}
