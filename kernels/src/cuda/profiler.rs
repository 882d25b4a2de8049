//! Device-time profiling of every launch (kernels, GEMMs, memsets): when on, each op is bracketed
//! by two timing events on the stream; `stop` waits for the stream and sums the gaps by op name.
//! Off (the default) it costs one mutex check per launch.

use super::device_err;
use crate::{KernelError, OpTime, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use std::sync::{Arc, Mutex};

struct Record {
    name: String,
    flops: f64,
    start: CudaEvent,
    end: CudaEvent,
}

/// The records of the region being profiled (`None` when profiling is off).
#[derive(Default)]
pub(crate) struct Profiler {
    records: Mutex<Option<Vec<Record>>>,
}

/// An op being timed: its start event is recorded; `finish` records the end.
pub(crate) struct Timing {
    start: CudaEvent,
}

impl Profiler {
    pub(crate) fn start(&self) {
        *self.records.lock().expect("profiler lock") = Some(Vec::new());
    }

    /// Records a start event if profiling is on.
    pub(crate) fn begin(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
    ) -> Result<Option<Timing>> {
        if self.records.lock().expect("profiler lock").is_none() {
            return Ok(None);
        }
        let start = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(device_err("profile event"))?;
        start.record(stream).map_err(device_err("profile event"))?;
        Ok(Some(Timing { start }))
    }

    /// Records the end event of an op started with [`Profiler::begin`].
    pub(crate) fn finish(
        &self,
        timing: Option<Timing>,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        name: impl FnOnce() -> String,
        flops: impl FnOnce() -> f64,
    ) -> Result<()> {
        let Some(Timing { start }) = timing else {
            return Ok(());
        };
        let end = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(device_err("profile event"))?;
        end.record(stream).map_err(device_err("profile event"))?;
        if let Some(records) = self.records.lock().expect("profiler lock").as_mut() {
            records.push(Record {
                name: name(),
                flops: flops(),
                start,
                end,
            });
        }
        Ok(())
    }

    /// Ends the region: waits for its work and returns the time per op, largest first.
    pub(crate) fn stop(&self) -> Result<Vec<OpTime>> {
        let records = self
            .records
            .lock()
            .expect("profiler lock")
            .take()
            .unwrap_or_default();
        let mut timed = Vec::with_capacity(records.len());
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let elapsed = event_elapsed_fn()?;
        for r in records {
            r.end.synchronize().map_err(device_err("profile event"))?;
            timed.push((
                r.name,
                elapsed_ms(elapsed, &r.start, &r.end)? as f64,
                r.flops,
            ));
        }
        Ok(crate::summarise_op_times(timed))
    }
}

type ElapsedFn = unsafe extern "C" fn(
    *mut f32,
    cudarc::driver::sys::CUevent,
    cudarc::driver::sys::CUevent,
) -> cudarc::driver::sys::CUresult;

fn unavailable(what: &str) -> KernelError {
    KernelError::Device {
        op: "profile event",
        message: format!("{what}; profiling needs libcuda's cuEventElapsedTime"),
    }
}

/// `cuEventElapsedTime`, looked up in the loaded libcuda by name: every driver exports it, while the
/// `_v2` that cudarc's CUDA 13 bindings call needs a 12.8+ driver and would narrow the drivers the
/// binary runs on (scripts/cuda-symbols.py).
fn event_elapsed_fn() -> Result<ElapsedFn> {
    // SAFETY: libcuda.so.1 is already loaded by the backend (RTLD_NOLOAD only finds it); the symbol
    // has this C signature in every CUDA driver.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if lib.is_null() {
            return Err(unavailable("libcuda.so.1 is not loaded"));
        }
        let sym = libc::dlsym(lib, c"cuEventElapsedTime".as_ptr());
        if sym.is_null() {
            return Err(unavailable("libcuda.so.1 has no cuEventElapsedTime"));
        }
        Ok(std::mem::transmute::<*mut libc::c_void, ElapsedFn>(sym))
    }
}

/// Milliseconds between two completed events.
fn elapsed_ms(f: ElapsedFn, start: &CudaEvent, end: &CudaEvent) -> Result<f32> {
    let mut ms = 0.0f32;
    // SAFETY: both events are live, recorded and complete (synchronized by the caller).
    let status = unsafe { f(&mut ms, start.cu_event(), end.cu_event()) };
    if status != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(unavailable(&format!(
            "cuEventElapsedTime failed ({status:?})"
        )));
    }
    Ok(ms)
}
