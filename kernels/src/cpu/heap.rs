//! Keeps freed tensor memory inside the process. The CPU backend's tensors are heap `Vec`s that
//! every step allocates and frees in the same sizes; by default glibc hands blocks over its
//! mmap threshold (128 KiB at start, rising up to 32 MiB as blocks are freed) back to the kernel
//! on free, and trims the top of the heap, so the next step touches fresh pages: one page
//! fault and one zero-fill per 4 KiB. Measured on SmolLM2-135M (batch 2 × 512, one thread, a
//! loaded machine): 13.4 s per step instead of 17.0 s, 0.45 M page faults per run instead of
//! 1.11 M (docs/benchmarks.md).

use std::sync::Once;

/// Serves blocks up to 32 MiB (glibc's largest threshold) from the heap and never trims it, so
/// the process keeps its peak footprint. Once per process; other C libraries: nothing to do.
pub fn keep_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes glibc's allocation policy; it is called before the
        // backend allocates anything.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}
