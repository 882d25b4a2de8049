//! Device-time profiling of every launch (kernels, GEMMs, memsets): when on, each op is bracketed
//! by two timing events on the stream; `stop` waits for the stream and sums the gaps by op name,
//! and the stream's idle time between ops by the op that waited ([`crate::idle_name`]).
//! Off (the default) it costs one mutex check per launch.

use super::device_err;
use super::event_timing::EventClock;
use crate::{OpTime, Result};
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
        let clock = EventClock::new("profile event")?;
        for (i, r) in records.iter().enumerate() {
            timed.push((
                r.name.clone(),
                clock.elapsed_ms(&r.start, &r.end)? as f64,
                r.flops,
            ));
            // The stream's time between the previous op's end and this one's start: waits on
            // other streams' events (offload copies) or on the host's launches.
            if let Some(prev) = i.checked_sub(1).map(|p| &records[p]) {
                let idle = clock.elapsed_ms(&prev.end, &r.start)? as f64;
                timed.push((crate::idle_name(&r.name, idle), idle, 0.0));
            }
        }
        Ok(crate::summarise_op_times(timed))
    }
}
