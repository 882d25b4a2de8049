//! Device tensors and the caching allocator behind them.
//!
//! A [`CudaTensor`] is a flat device buffer with its dtype: f32 storage for `DType::F32`, 16-bit
//! storage for bf16 and f16. Dropping one returns its buffer to a pool keyed by (storage kind,
//! capacity), so the activation buffers of one layer are reused by the next layer and the next
//! step without going back to the driver. A tensor takes the smallest free buffer of its kind that
//! holds it and is at most [`crate::POOL_REUSE_SLACK`] times its length: so a layer's attention tensors
//! reuse the larger MLP buffers the backward has just freed instead of raising the peak (0.07-0.29
//! GiB less across `fuselora plan`'s presets). The ops' f32 scratch lives in 16-bit storage
//! (`CudaBackend::alloc_f32_scratch`) to share those buffers too. The pool counts the bytes it
//! holds from the driver (in use plus cached) and remembers the peak: that is the memory the
//! training run needs.

use crate::{pool_buffer_fits, DType, KernelError, Result};
use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut, DevicePtr};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The buffer behind a tensor: f32 words or 16-bit words (bf16 and f16 share the storage kind).
pub(crate) enum Storage {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

impl Storage {
    fn bytes(&self) -> usize {
        match self {
            Storage::F32(s) => s.len() * 4,
            Storage::Half(s) => s.len() * 2,
        }
    }
}

#[derive(Default)]
struct PoolState {
    free: HashMap<(bool, usize), Vec<Storage>>,
    held_bytes: u64,
    peak_bytes: u64,
}

/// Freed buffers waiting for a tensor of the same kind that they hold.
#[derive(Default)]
pub(crate) struct Pool {
    state: Mutex<PoolState>,
}

impl Pool {
    /// The smallest cached buffer of this kind with room for `len` elements and at most
    /// [`crate::POOL_REUSE_SLACK`] times that ([`pool_buffer_fits`]), if one is free.
    pub(crate) fn take(&self, is_f32: bool, len: usize) -> Option<Storage> {
        let mut s = self.state.lock().expect("pool lock");
        let capacity = s
            .free
            .iter()
            .filter(|&(&(kind, cap), v)| {
                kind == is_f32 && !v.is_empty() && pool_buffer_fits(len, cap)
            })
            .map(|(&(_, cap), _)| cap)
            .min()?;
        s.free.get_mut(&(is_f32, capacity)).and_then(|v| v.pop())
    }

    /// Counts a buffer freshly allocated from the driver.
    pub(crate) fn count_new(&self, bytes: usize) {
        let mut s = self.state.lock().expect("pool lock");
        s.held_bytes += bytes as u64;
        s.peak_bytes = s.peak_bytes.max(s.held_bytes);
    }

    /// Uncounts a buffer handed back to the driver.
    pub(crate) fn count_freed(&self, bytes: usize) {
        self.state.lock().expect("pool lock").held_bytes -= bytes as u64;
    }

    fn give_back(&self, storage: Storage) {
        let key = (matches!(storage, Storage::F32(_)), storage_len(&storage));
        self.state
            .lock()
            .expect("pool lock")
            .free
            .entry(key)
            .or_default()
            .push(storage);
    }

    /// Bytes held from the driver at the worst moment so far.
    pub(crate) fn peak_bytes(&self) -> u64 {
        self.state.lock().expect("pool lock").peak_bytes
    }

    /// Hands every cached buffer back to the driver.
    pub(crate) fn release_cached(&self) {
        let mut s = self.state.lock().expect("pool lock");
        let freed: usize = s.free.values().flatten().map(Storage::bytes).sum();
        s.free.clear();
        s.held_bytes -= freed as u64;
    }
}

fn storage_len(s: &Storage) -> usize {
    match s {
        Storage::F32(x) => x.len(),
        Storage::Half(x) => x.len(),
    }
}

/// A flat device buffer of f32, bf16 or f16 values: the first `len` elements of its storage.
pub struct CudaTensor {
    pub(crate) storage: Option<Storage>,
    pub(crate) len: usize,
    pub(crate) dtype: DType,
    pub(crate) pool: Arc<Pool>,
}

impl CudaTensor {
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 elements, for collective communication (NCCL all-reduce of LoRA gradients);
    /// `None` for bf16/f16 tensors.
    pub fn slice_f32_mut(&mut self) -> Option<CudaViewMut<'_, f32>> {
        let len = self.len;
        match self.storage.as_mut() {
            Some(Storage::F32(s)) => Some(s.slice_mut(..len)),
            _ => None,
        }
    }

    /// The raw device address, for kernel arguments.
    pub(crate) fn ptr(&self, stream: &CudaStream) -> u64 {
        match self
            .storage
            .as_ref()
            .expect("tensor storage present until drop")
        {
            Storage::F32(s) => s.device_ptr(stream).0,
            Storage::Half(s) => s.device_ptr(stream).0,
        }
    }
}

impl Drop for CudaTensor {
    fn drop(&mut self) {
        if let Some(s) = self.storage.take() {
            self.pool.give_back(s);
        }
    }
}

/// Token ids, labels, positions or packed NF4 codes on the device. Uploaded indices keep a host
/// copy for validation (token ids inside the vocabulary, positions inside the RoPE table); indices
/// a kernel wrote (NF4 quantization) have none. Their bytes count in the pool's held and peak bytes,
/// so a 4-bit model's packed weights show in the reported peak memory.
pub struct CudaIndices {
    pub(crate) slice: CudaSlice<i32>,
    host: Option<Vec<i32>>,
    pool: Arc<Pool>,
}

impl CudaIndices {
    /// Wraps a fresh device buffer, counting its bytes in `pool`.
    pub(crate) fn new(slice: CudaSlice<i32>, host: Option<Vec<i32>>, pool: Arc<Pool>) -> Self {
        pool.count_new(slice.len() * 4);
        CudaIndices { slice, host, pool }
    }

    /// The raw device address, for kernel arguments.
    pub(crate) fn ptr(&self, stream: &CudaStream) -> u64 {
        self.slice.device_ptr(stream).0
    }

    /// The uploaded values, for `op` to validate; an error for indices written on the device.
    pub(crate) fn host(&self, op: &'static str) -> Result<&[i32]> {
        self.host.as_deref().ok_or_else(|| {
            KernelError::Unsupported(format!(
                "{op}: these indices were written on the device (NF4 codes) and have no host copy \
                 to check; pass indices made by upload_indices"
            ))
        })
    }

    /// Number of indices.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }
}

impl Drop for CudaIndices {
    fn drop(&mut self) {
        self.pool.count_freed(self.slice.len() * 4);
    }
}
