//! glibc allocator tuning for training on CPU, and huge pages for the weights decoding streams.
//!
//! A training step allocates and frees hundreds of multi-megabyte activation and gradient buffers.
//! With glibc's defaults, blocks above the mmap threshold are `mmap`ed and `munmap`ed every time,
//! and freed heap tops are trimmed back to the OS, so every step page-faults its whole working
//! set in again: measured here (GUIDE §4) the stock MiniLM step spent ~45% of its wall time in the
//! kernel (3.5 s vs 2.2 s with the settings below). Keeping freed memory in the process fixes it.

use candle_core::{CpuStorage, Storage, Tensor};

/// Keeps freed memory inside the process: no `mmap` for large blocks, no trimming of the heap
/// top below 2 GiB of free space, and a 256 MiB pad on each heap growth. Call once at start-up,
/// before the first large allocation (later calls are harmless). Returns whether every setting
/// was accepted; a no-op returning `false` on platforms without glibc.
///
/// `M_TRIM_THRESHOLD` takes a C `int`, so the 16 GiB that the environment-variable form accepts
/// is capped at `i32::MAX` (2 GiB), which is already far above a step's working set.
#[allow(unsafe_code)]
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let settings = [
            (libc::M_MMAP_MAX, 0),
            (libc::M_TRIM_THRESHOLD, i32::MAX),
            (libc::M_TOP_PAD, 256 << 20),
        ];
        let mut ok = true;
        for (param, value) in settings {
            // SAFETY: `mallopt` only adjusts glibc's allocator parameters; it is thread-safe (it
            // takes the arena lock), touches no memory of ours, and these are documented params
            // with in-range values. It returns 1 on success and 0 on error.
            ok &= unsafe { libc::mallopt(param, value) } == 1;
        }
        ok
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Smallest transparent huge page on x86-64 and aarch64 Linux (2 MiB).
const HUGE_PAGE: usize = 2 << 20;

/// Moves the f32 and bf16 CPU tensors of `tensors` onto 2 MiB transparent huge pages, where the kernel
/// allows it, and returns how many bytes now sit on them.
///
/// Decoding streams every weight once per generated token; on 4 KiB pages that is a TLB miss
/// every 4 KiB and a hardware prefetcher that stops at each page boundary. Measured here on
/// SmolLM2-135M (`cargo bench --bench generate`), 2 MiB pages raised batch-1 decoding from
/// ~22 to ~27 tokens/s. `madvise(MADV_COLLAPSE)` (Linux 6.1+) rewrites the pages once,
/// synchronously (~0.9 s per 512 MiB here); where the call is refused (older kernels, THP set
/// to `never`, other platforms) nothing changes but the speed.
pub fn collapse_into_huge_pages<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> usize {
    collapse_with_errors(tensors).0
}

/// [`collapse_into_huge_pages`], plus the first error the kernel returned for a range that was
/// not collapsed (none when every range was, or was too small to hold a huge page).
fn collapse_with_errors<'a>(
    tensors: impl IntoIterator<Item = &'a Tensor>,
) -> (usize, Option<std::io::Error>) {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let guards: Vec<_> = tensors
        .into_iter()
        .map(Tensor::storage_and_layout)
        .collect();
    for (storage, _) in &guards {
        // f32 weights, and the bf16 ones a frozen model holds (`policy.precision: bf16`).
        let (start, bytes) = match &**storage {
            Storage::Cpu(CpuStorage::F32(data)) => (data.as_ptr() as usize, size_of_val(&data[..])),
            Storage::Cpu(CpuStorage::BF16(data)) => {
                (data.as_ptr() as usize, size_of_val(&data[..]))
            }
            _ => continue,
        };
        ranges.push((start, start + bytes));
    }
    // Weights loaded one after another usually sit back to back on the heap; most per-layer
    // matrices are smaller than a huge page, so only the merged run of them can be collapsed.
    ranges.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start < last.1 + HUGE_PAGE => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut bytes = 0;
    let mut first_error = None;
    for (start, end) in merged {
        match collapse_range(start, end - start) {
            Ok(collapsed) => bytes += collapsed,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    (bytes, first_error)
}

/// Collapses the whole huge pages inside `[start, start + len)`, memory of this process's heap;
/// returns the bytes collapsed, or the kernel's reason for refusing.
#[allow(unsafe_code)]
fn collapse_range(start: usize, len: usize) -> std::io::Result<usize> {
    let begin = start.next_multiple_of(HUGE_PAGE);
    let end = (start + len) / HUGE_PAGE * HUGE_PAGE;
    if end <= begin {
        return Ok(0);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let addr = begin as *mut libc::c_void;
        // SAFETY: the range starts and ends inside live tensors that the caller's storage guards
        // keep alive (both ends rounded inwards); what lies between them is this process's own
        // memory, or unmapped, which madvise skips with ENOMEM. MADV_HUGEPAGE only sets the
        // mapping's page-size policy and MADV_COLLAPSE replaces pages with huge pages holding
        // the same bytes (madvise(2)): no byte that Rust can observe changes, whoever owns it.
        let collapsed = unsafe {
            libc::madvise(addr, end - begin, libc::MADV_HUGEPAGE) == 0
                && libc::madvise(addr, end - begin, libc::MADV_COLLAPSE) == 0
        };
        if collapsed {
            Ok(end - begin)
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapsing_keeps_every_value_and_uses_huge_pages_where_the_kernel_allows() {
        // Four 5 MiB tensors (any 4 MiB range holds a whole aligned 2 MiB page) and one tensor
        // smaller than a page.
        let device = candle_core::Device::Cpu;
        let tensors: Vec<Tensor> = (0..4)
            .map(|t| {
                let data: Vec<f32> = (0..(5 << 18)).map(|i| (i * 7 + t) as f32).collect();
                Tensor::from_vec(data, (5 << 8, 1 << 10), &device).unwrap()
            })
            .chain([Tensor::new(&[1f32, 2.0], &device).unwrap()])
            .collect();
        let before: Vec<Vec<f32>> = tensors
            .iter()
            .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let (bytes, error) = collapse_with_errors(&tensors);
        let after: Vec<Vec<f32>> = tensors
            .iter()
            .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        assert_eq!(before, after);
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        // EAGAIN and ENOMEM are the kernel saying it has no free 2 MiB page right now (a
        // fragmented or busy machine, e.g. while other tests allocate): then only the values
        // can be checked. Any other refusal (EINVAL: a bad range or flag) is a bug here.
        let no_free_huge_page = error
            .as_ref()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| {
                cfg!(target_os = "linux") && (code == libc::EAGAIN || code == libc::ENOMEM)
            });
        if cfg!(all(target_os = "linux", target_env = "gnu")) && !thp.contains("[never]") {
            if no_free_huge_page {
                eprintln!("huge pages not checked: the kernel had none free ({error:?})");
            } else {
                assert!(
                    bytes >= 4 * HUGE_PAGE,
                    "only {bytes} bytes on huge pages ({error:?})"
                );
            }
        }
        assert_eq!(bytes % HUGE_PAGE, 0);
    }
}
