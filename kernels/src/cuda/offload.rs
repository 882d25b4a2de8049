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

use super::launch::Arg;
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

    /// `out[i,:] ← table[ids[i],:]` from a `[vocab, hidden]` table parked in host memory: the
    /// embedding kernel reads the rows across the host link itself. Pinned host memory is readable
    /// by kernels at its host address in every 64-bit CUDA process (unified addressing), so the
    /// gather is one launch on the compute stream (after the table's own copy to the host, once at
    /// load): the host neither gathers nor waits (session 12: the host-side gather was device idle
    /// at the start of every step).
    pub(crate) fn embedding_from_host_impl(
        &self,
        table: &CudaParked,
        ids: &CudaIndices,
        hidden: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
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
        let host_ids = ids.host("embedding_from_host")?;
        crate::error::check_len(
            "embedding_from_host",
            "out",
            out.len(),
            host_ids.len() * hidden,
        )?;
        super::check_token_ids("embedding_from_host", host_ids, part.len / hidden.max(1))?;
        if host_ids.is_empty() {
            return Ok(());
        }
        self.stream
            .wait(&table.copied)
            .map_err(device_err("order the gather after the table's copy"))?;
        self.launch(
            &format!("embedding_{}", super::suffix(out.dtype)),
            (host_ids.len() as u32, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(part.host.ptr as u64),
                self.pi(ids),
                self.p(out),
                Arg::I32(hidden as i32),
            ],
        )
    }
}
