//! The communicator of GPU ranks: NCCL through `cudarc::nccl`, one communicator per process on
//! the GPU of its local rank.
//!
//! Gradients live on the device, so the trainer calls the device methods, which enqueue the
//! collective on the stream the communicator was built with (pass the backend's compute stream
//! and no extra synchronisation is needed between backward, the all-reduce and the optimizer):
//!
//! ```ignore
//! let ctx = CudaContext::new(info.local_rank)?;           // bind this rank's GPU
//! let stream = ctx.default_stream();                      // the backend's stream
//! let comms = comms::connect(&info, comms::Placement::Cuda(stream.clone()), timeout)?;
//! if let Some(nccl) = comms.nccl() {
//!     nccl.all_reduce_device(&mut lora_grads, ReduceOp::Average)?;  // CudaSlice<f32>
//! }
//! ```
//!
//! The host-buffer [`Communicator`] methods copy through the device and wait: they are for small
//! things such as a loss to log, not for gradients. Barrier is an all-reduce of one element.

use crate::{Communicator, Error, ReduceOp, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{Comm, Id, NcclType};
use half::bf16;
use std::sync::Arc;

/// Bytes in an NCCL unique id (`ncclUniqueId`), what rank 0 shares with the others.
pub const NCCL_ID_BYTES: usize = 128;

/// An NCCL communicator bound to one CUDA stream.
pub struct NcclCommunicator {
    comm: Comm,
}

impl NcclCommunicator {
    /// Creates the id rank 0 shares with every rank (loads libnccl on first use).
    pub fn new_unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
        check_nccl_loadable()?;
        let id = Id::new().map_err(|e| Error::Nccl(format!("ncclGetUniqueId: {e:?}")))?;
        Ok(id.internal().map(|c| c as u8))
    }

    /// Joins the communicator named by `id` as `rank` of `world_size`, on `stream`'s GPU.
    /// Blocks until every rank has joined.
    pub fn init(
        stream: Arc<CudaStream>,
        rank: usize,
        world_size: usize,
        id: &[u8; NCCL_ID_BYTES],
    ) -> Result<NcclCommunicator> {
        check_nccl_loadable()?;
        let id = Id::uninit(id.map(|b| b as core::ffi::c_char));
        let comm = Comm::from_rank(stream, rank, world_size, id).map_err(|e| {
            Error::Nccl(format!(
                "ncclCommInitRank (rank {rank} of {world_size}): {e:?}; \
                 run with NCCL_DEBUG=INFO to see why"
            ))
        })?;
        Ok(NcclCommunicator { comm })
    }

    /// The stream collectives are enqueued on.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.comm.stream()
    }

    /// Combines a device buffer over all ranks in place, asynchronously on [`Self::stream`].
    pub fn all_reduce_device<T: NcclType>(
        &self,
        buf: &mut impl DevicePtrMut<T>,
        op: ReduceOp,
    ) -> Result<()> {
        let op = match op {
            ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
            ReduceOp::Average => cudarc::nccl::ReduceOp::Avg,
        };
        self.comm
            .all_reduce_in_place(buf, &op)
            .map_err(|e| Error::Nccl(format!("ncclAllReduce of {} elements: {e:?}", buf.len())))?;
        Ok(())
    }

    /// All-reduces every buffer in one NCCL group: the calls are fused into a single launch, so
    /// hundreds of small LoRA gradients cost about what one buffer of their total size costs.
    pub fn all_reduce_device_group<'a, T: NcclType, B: DevicePtrMut<T> + 'a>(
        &self,
        bufs: impl IntoIterator<Item = &'a mut B>,
        op: ReduceOp,
    ) -> Result<()> {
        let group = |what: &str,
                     r: std::result::Result<
            cudarc::nccl::result::NcclStatus,
            cudarc::nccl::result::NcclError,
        >| {
            r.map(|_| ())
                .map_err(|e| Error::Nccl(format!("{what}: {e:?}")))
        };
        group("ncclGroupStart", cudarc::nccl::result::group_start())?;
        let mut outcome = Ok(());
        for buf in bufs {
            outcome = self.all_reduce_device(buf, op);
            if outcome.is_err() {
                break;
            }
        }
        // The group must be closed even when a call failed, or NCCL stays in group mode.
        let closed = group("ncclGroupEnd", cudarc::nccl::result::group_end());
        outcome.and(closed)
    }

    /// Copies rank `root`'s device buffer to every rank, asynchronously on [`Self::stream`].
    pub fn broadcast_device<T: NcclType>(&self, buf: &mut CudaSlice<T>, root: usize) -> Result<()> {
        check_root(root, self.world_size())?;
        self.comm
            .broadcast_in_place(buf, root as i32)
            .map_err(|e| Error::Nccl(format!("ncclBroadcast from rank {root}: {e:?}")))?;
        Ok(())
    }

    /// Runs `collective` on a device copy of `buf` and copies the result back, waiting for it.
    fn through_device<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        buf: &mut [T],
        collective: impl FnOnce(&mut CudaSlice<T>) -> Result<()>,
    ) -> Result<()> {
        let stream = self.stream();
        let driver = |e: cudarc::driver::DriverError| Error::Nccl(format!("CUDA copy: {e}"));
        let mut device = stream.clone_htod(buf).map_err(driver)?;
        collective(&mut device)?;
        stream.memcpy_dtoh(&device, buf).map_err(driver)?;
        stream.synchronize().map_err(driver)
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn describe(&self) -> String {
        format!("nccl ({} ranks)", self.world_size())
    }

    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.through_device(buf, |d| self.all_reduce_device(d, op))
    }

    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        self.through_device(buf, |d| self.all_reduce_device(d, op))
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.through_device(buf, |d| self.broadcast_device(d, root))
    }

    fn barrier(&self) -> Result<()> {
        self.through_device(&mut [0f32], |d| self.all_reduce_device(d, ReduceOp::Sum))
    }
}

/// Whether cudarc can open NCCL by one of the names it tries (`libnccl.so` and a few versioned
/// ones, but not `libnccl.so.2`, the only name that the `libnccl2` package and the `nvidia-nccl`
/// wheels install; `fuselora` links one for its ranks).
pub fn nccl_loadable() -> bool {
    // SAFETY: is_culib_present only dlopens candidate names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// Fails with the fix, where cudarc would panic, when no NCCL library it looks for can be
/// loaded.
fn check_nccl_loadable() -> Result<()> {
    if nccl_loadable() {
        return Ok(());
    }
    let candidates = cudarc::get_lib_name_candidates("nccl");
    let fix = match loaded_path("libnccl.so.2", Some(c"ncclGetUniqueId")) {
        Some(path) => format!(
            "{path} is installed but cudarc loads `libnccl.so`: run \
             `mkdir -p ~/.local/lib && ln -sf {path} ~/.local/lib/libnccl.so` and add \
             ~/.local/lib to LD_LIBRARY_PATH (the `fuselora` binary does this itself for ranks of \
             a multi-rank job)"
        ),
        None => "install NCCL (Debian/Ubuntu: libnccl2 libnccl-dev; or pip nvidia-nccl-cu12) \
                 and put the folder holding libnccl.so on LD_LIBRARY_PATH"
            .to_string(),
    };
    Err(Error::Nccl(format!(
        "no NCCL library found (tried {}): {fix}",
        candidates.join(", ")
    )))
}

/// Whether the dynamic loader can load `name`: `Some` path of the file it found (when `symbol`
/// is given and the loader can say where that symbol lives), else `Some("")`, or `None`.
fn loaded_path(name: &str, symbol: Option<&std::ffi::CStr>) -> Option<String> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: dlopen/dlsym/dladdr with valid C strings; the file name is copied out before
    // dlclose (the library stays loaded only if something else holds it).
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return None;
        }
        let mut path = String::new();
        if let Some(symbol) = symbol {
            let address = libc::dlsym(handle, symbol.as_ptr());
            let mut info: libc::Dl_info = std::mem::zeroed();
            if !address.is_null()
                && libc::dladdr(address, &mut info) != 0
                && !info.dli_fname.is_null()
            {
                path = std::ffi::CStr::from_ptr(info.dli_fname)
                    .to_string_lossy()
                    .into_owned();
            }
        }
        libc::dlclose(handle);
        Some(path)
    }
}

fn check_root(root: usize, world_size: usize) -> Result<()> {
    if root >= world_size {
        return Err(Error::Mismatch(format!(
            "broadcast from rank {root} in a world of {world_size} ranks"
        )));
    }
    Ok(())
}
