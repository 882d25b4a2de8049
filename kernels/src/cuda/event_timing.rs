//! Milliseconds between two recorded events, for the profiler and the GEMM tuner.
//!
//! `cuEventElapsedTime` is looked up in the loaded libcuda by name: every driver exports it, while
//! the `_v2` that cudarc's CUDA 13 bindings call needs a 12.8+ driver and would narrow the drivers
//! the binary runs on (scripts/cuda-symbols.py, run by CI, fails the build when it would).

use crate::{KernelError, Result};
use cudarc::driver::CudaEvent;

type ElapsedFn = unsafe extern "C" fn(
    *mut f32,
    cudarc::driver::sys::CUevent,
    cudarc::driver::sys::CUevent,
) -> cudarc::driver::sys::CUresult;

/// libcuda's `cuEventElapsedTime`, resolved once per use site.
#[derive(Clone, Copy)]
pub(crate) struct EventClock {
    elapsed: ElapsedFn,
    op: &'static str,
}

impl EventClock {
    /// Resolves the function; `op` names the caller in errors ("profile event", "time a gemm").
    pub(crate) fn new(op: &'static str) -> Result<Self> {
        // SAFETY: libcuda.so.1 is already loaded by the backend (RTLD_NOLOAD only finds it); the
        // symbol has this C signature in every CUDA driver.
        unsafe {
            let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            if lib.is_null() {
                return Err(unavailable(op, "libcuda.so.1 is not loaded"));
            }
            let sym = libc::dlsym(lib, c"cuEventElapsedTime".as_ptr());
            if sym.is_null() {
                return Err(unavailable(op, "libcuda.so.1 has no cuEventElapsedTime"));
            }
            Ok(Self {
                elapsed: std::mem::transmute::<*mut libc::c_void, ElapsedFn>(sym),
                op,
            })
        }
    }

    /// Milliseconds from `start` to `end`; waits for `end` to complete first.
    pub(crate) fn elapsed_ms(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f32> {
        end.synchronize().map_err(super::device_err(self.op))?;
        let mut ms = 0.0f32;
        // SAFETY: both events are live and recorded, and `end` (so also `start`) is complete.
        let status = unsafe { (self.elapsed)(&mut ms, start.cu_event(), end.cu_event()) };
        if status != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            return Err(unavailable(
                self.op,
                &format!("cuEventElapsedTime failed ({status:?})"),
            ));
        }
        Ok(ms)
    }
}

fn unavailable(op: &'static str, what: &str) -> KernelError {
    KernelError::Device {
        op,
        message: format!("{what}; timing needs libcuda's cuEventElapsedTime"),
    }
}
