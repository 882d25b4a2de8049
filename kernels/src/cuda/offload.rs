//! Checkpoint offload: [`Backend::park`](crate::Backend::park) copies a group of tensors (one
//! layer's checkpoint, or one layer's optimizer state) into pinned host memory on a copy stream
//! while the compute stream goes on, and [`Backend::prefetch`](crate::Backend::prefetch) /
//! [`Backend::unpark`](crate::Backend::unpark) bring it back ahead of its use on a second, fetch
//! stream, so that copies in the two directions overlap (the link carries both at once: 55 GB/s
//! one way, 97 GB/s both ways together on an H200). The backend runs without cudarc's per-buffer
//! event tracking, so the order between the streams is set here with events:
//!
//! - park: compute records `ready` → the copy stream waits for it, copies device → host, records
//!   `copied` (kept with the group, and with its device buffers). The device buffers go back to
//!   the pool at a later park or fetch of the same lane ([`InFlight`]), after the compute stream
//!   waits for `copied` — by then the copies have had a whole layer's time, so the wait costs
//!   nothing and later ops that reuse the buffers run after the copies read them.
//! - prefetch: buffers from the pool; compute records `free` (every op that used that buffer
//!   before is queued ahead of it) → the fetch stream waits for it and for the group's `copied`,
//!   copies host → device, records `fetched`.
//! - unpark: the compute stream waits for `fetched`.
//!
//! Host buffers are pinned (page-locked, so the copies are asynchronous DMA) and reused by size:
//! the offloaded checkpoints of one step are allocated once.

use super::tensor::{CudaIndices, CudaTensor};
use super::{device_err, CudaBackend};
use crate::{DType, InFlight, KernelError, ParkLane, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{result, CudaEvent, CudaStream};
use std::collections::HashMap;
use std::sync::Mutex;

/// Page-locked host memory from the driver.
pub(crate) struct HostBuffer {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the buffer is plain memory owned by this value; the copies that use it are ordered by
// events on the owning backend's streams.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    fn new(bytes: usize) -> Result<Self> {
        // SAFETY: a fresh allocation of `bytes`; freed once in Drop.
        let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }
            .map_err(device_err("pinned host alloc"))? as *mut u8;
        Ok(HostBuffer { ptr, bytes })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `bytes` bytes for the life of self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host; no copy uses it any more (the backend drops its
        // buffers after synchronizing, and a parked tensor is dropped only after its copies).
        let _ = unsafe { result::free_host(self.ptr as *mut _) };
    }
}

/// A group of tensors in pinned host memory (one [`HostBuffer`] each), and their device copies once
/// fetched back.
pub struct CudaParked {
    parts: Vec<ParkedPart>,
    lane: ParkLane,
    /// On the copy stream: the host buffers hold the values after it.
    copied: CudaEvent,
    /// The device copies and the event (on the copy stream) after which they hold the values.
    fetched: Option<(Vec<CudaTensor>, CudaEvent)>,
}

struct ParkedPart {
    host: HostBuffer,
    len: usize,
    dtype: DType,
}

/// The offload state of a backend: the free pinned buffers and the last parked device tensors.
#[derive(Default)]
pub(crate) struct Offload {
    free_host: Mutex<HashMap<usize, Vec<HostBuffer>>>,
    /// Parked groups' device buffers and the events (on the copy stream) after which they are copied.
    in_flight: Mutex<InFlight<(CudaEvent, Vec<CudaTensor>)>>,
    /// The pinned rows of the last [`CudaBackend::embedding_from_host_impl`] and the event (on
    /// the compute stream) after which their copy to the device is done.
    rows_in_flight: Mutex<Option<(CudaEvent, HostBuffer)>>,
}

impl CudaBackend {
    fn event(stream: &CudaStream) -> Result<CudaEvent> {
        stream
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(device_err("record event"))
    }

    /// Returns the parked device buffers that a call from `lane` may release ([`InFlight`]) to
    /// the pool, after the compute stream waits for their copy to the host.
    fn release_in_flight(&self, lane: ParkLane) -> Result<()> {
        let released = self
            .offload
            .in_flight
            .lock()
            .expect("offload lock")
            .release(lane);
        for (copied, tensors) in released {
            self.stream
                .wait(&copied)
                .map_err(device_err("wait for offload"))?;
            drop(tensors);
        }
        Ok(())
    }

    /// A pinned buffer of `bytes` from the free list, or a new one.
    fn host_buffer(&self, bytes: usize) -> Result<HostBuffer> {
        let reused = self
            .offload
            .free_host
            .lock()
            .expect("offload lock")
            .get_mut(&bytes)
            .and_then(Vec::pop);
        match reused {
            Some(h) => Ok(h),
            None => HostBuffer::new(bytes),
        }
    }

    /// Puts a pinned buffer whose copies are done on the free list.
    fn return_host_buffer(&self, buffer: HostBuffer) {
        let mut free = self.offload.free_host.lock().expect("offload lock");
        free.entry(buffer.bytes).or_default().push(buffer);
    }

    pub(crate) fn park_impl(&self, tensors: Vec<CudaTensor>, lane: ParkLane) -> Result<CudaParked> {
        self.release_in_flight(lane)?;
        let ready = Self::event(&self.stream)?;
        self.copy_stream
            .wait(&ready)
            .map_err(device_err("offload wait"))?;
        let mut parts = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let (len, dtype) = (t.len(), t.dtype);
            let mut host = self.host_buffer(len * dtype.size_bytes())?;
            if len > 0 {
                // SAFETY: `t` stays alive (in_flight) until the compute stream has waited for
                // `copied`; `host` lives in the returned handle.
                unsafe {
                    result::memcpy_dtoh_async(
                        host.as_mut_slice(),
                        t.ptr(&self.copy_stream),
                        self.copy_stream.cu_stream(),
                    )
                }
                .map_err(device_err("offload copy to host"))?;
            }
            parts.push(ParkedPart { host, len, dtype });
        }
        self.offload
            .in_flight
            .lock()
            .expect("offload lock")
            .push(lane, (Self::event(&self.copy_stream)?, tensors));
        Ok(CudaParked {
            parts,
            lane,
            copied: Self::event(&self.copy_stream)?,
            fetched: None,
        })
    }

    pub(crate) fn prefetch_impl(&self, p: &mut CudaParked) -> Result<()> {
        if p.fetched.is_some() {
            return Ok(());
        }
        self.release_in_flight(p.lane)?;
        let tensors = p
            .parts
            .iter()
            .map(|part| self.alloc(part.len, part.dtype))
            .collect::<Result<Vec<_>>>()?;
        let free = Self::event(&self.stream)?;
        for ready in [&free, &p.copied] {
            self.fetch_stream
                .wait(ready)
                .map_err(device_err("fetch wait"))?;
        }
        for (t, part) in tensors.iter().zip(&p.parts) {
            if part.len > 0 {
                // SAFETY: `t` is not used by any op until the compute stream waits for `fetched`;
                // `part.host` outlives the copy (it goes back to the free list only after that
                // wait, and the next park that takes it queues its copy behind a compute-stream
                // event recorded after the wait).
                unsafe {
                    result::memcpy_htod_async(
                        t.ptr(&self.fetch_stream),
                        part.host.as_slice(),
                        self.fetch_stream.cu_stream(),
                    )
                }
                .map_err(device_err("offload copy to device"))?;
            }
        }
        p.fetched = Some((tensors, Self::event(&self.fetch_stream)?));
        Ok(())
    }

    pub(crate) fn unpark_impl(&self, mut p: CudaParked) -> Result<Vec<CudaTensor>> {
        self.prefetch_impl(&mut p)?;
        let (tensors, fetched) = p.fetched.take().expect("prefetched above");
        self.stream
            .wait(&fetched)
            .map_err(device_err("wait for fetch"))?;
        // Reusable by the next park: its copy waits for an event recorded after this wait.
        for part in p.parts {
            self.return_host_buffer(part.host);
        }
        Ok(tensors)
    }

    /// `out[i,:] ← table[ids[i],:]` from a `[vocab, hidden]` table parked in host memory: the rows
    /// are gathered on the host (every core) into a pinned buffer and copied up on the compute
    /// stream, without waiting: the buffer is kept until the next call, which waits for that copy
    /// (a step earlier, long done) before handing the buffer back.
    pub(crate) fn embedding_from_host_impl(
        &self,
        table: &CudaParked,
        ids: &CudaIndices,
        hidden: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        use rayon::prelude::*;
        let [part] = table.parts.as_slice() else {
            return Err(KernelError::Unsupported(format!(
                "embedding_from_host: the table is one parked tensor, not {}",
                table.parts.len()
            )));
        };
        if part.dtype != out.dtype {
            return Err(KernelError::Unsupported(format!(
                "embedding_from_host: the table is {} but out is {}",
                part.dtype.name(),
                out.dtype.name()
            )));
        }
        let ids = ids.host("embedding_from_host")?;
        crate::error::check_len("embedding_from_host", "out", out.len(), ids.len() * hidden)?;
        super::check_token_ids("embedding_from_host", ids, part.len / hidden.max(1))?;
        if ids.is_empty() {
            return Ok(());
        }
        // The table's own copy to the host (once, at load) and the previous rows' copy to the
        // device (a whole step ago) are done by now: these waits cost nothing in a step.
        table
            .copied
            .synchronize()
            .map_err(device_err("wait for the parked table"))?;
        let previous = self
            .offload
            .rows_in_flight
            .lock()
            .expect("offload lock")
            .take();
        if let Some((copied, rows)) = previous {
            copied
                .synchronize()
                .map_err(device_err("wait for the embedding rows"))?;
            self.return_host_buffer(rows);
        }
        let row = hidden * part.dtype.size_bytes();
        let mut staging = self.host_buffer(ids.len() * row)?;
        let src = part.host.as_slice();
        staging
            .as_mut_slice()
            .par_chunks_mut(row)
            .zip(ids.par_iter())
            .for_each(|(dst, &id)| dst.copy_from_slice(&src[id as usize * row..][..row]));
        // SAFETY: `out` holds ids.len() × hidden elements of the table's dtype (checked above);
        // `staging` is kept until the event recorded after the copy (the next call waits for it).
        unsafe {
            result::memcpy_htod_async(
                out.ptr(&self.stream),
                staging.as_slice(),
                self.stream.cu_stream(),
            )
        }
        .map_err(device_err("embedding rows to the device"))?;
        *self.offload.rows_in_flight.lock().expect("offload lock") =
            Some((Self::event(&self.stream)?, staging));
        Ok(())
    }
}
