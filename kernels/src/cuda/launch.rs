//! Loading the compiled kernels into the context and launching them by name with plain
//! arguments (device addresses as u64, sizes as i32/u64, scalars as f32).

use crate::KernelError;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

/// One kernel argument, passed by value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    U64(u64),
    F32(f32),
}

/// Tables a launch reads, uploaded together ([`upload_tables`]): the buffer (freed in stream order
/// once dropped, after the launch that reads it), its device address and each table's first word.
pub(crate) struct Tables {
    buffer: CudaSlice<u64>,
    base: u64,
    first_word: Vec<usize>,
}

impl Tables {
    /// Table `i`'s address, as a launch argument.
    pub(crate) fn arg(&self, i: usize) -> Arg {
        Arg::Ptr(self.base + 8 * self.first_word[i] as u64)
    }

    /// The first word of table `i` as the device holds it now (a launch's one-word result,
    /// uploaded with its tables as the initial value), read back on `stream`.
    pub(crate) fn read_word(&self, stream: &Arc<CudaStream>, i: usize) -> Result<u64, KernelError> {
        let at = self.first_word[i];
        let word = stream
            .clone_dtoh(&self.buffer.slice(at..at + 1))
            .map_err(super::device_err("download a launch's result"))?;
        Ok(word[0])
    }
}

/// Uploads `tables` side by side in one copy: each copy to the device is an op on the stream that
/// the next kernel waits behind (in the offloaded step, behind the copy engines' traffic too: the
/// profile's idle before these launches), so a launch makes one, not one a table.
pub(crate) fn upload_tables(
    stream: &Arc<CudaStream>,
    tables: &[&[u64]],
) -> Result<Tables, KernelError> {
    let buffer = stream
        .clone_htod(&tables.concat())
        .map_err(super::device_err("upload pointer tables"))?;
    let base = buffer.device_ptr(stream).0;
    let mut first_word = Vec::with_capacity(tables.len());
    let mut next = 0;
    for t in tables {
        first_word.push(next);
        next += t.len();
    }
    Ok(Tables {
        buffer,
        base,
        first_word,
    })
}

/// The loaded entry points, by name.
pub(crate) struct Kernels {
    pub(crate) functions: HashMap<String, CudaFunction>,
}

impl Kernels {
    pub(crate) fn get(&self, name: &str) -> Result<&CudaFunction, KernelError> {
        self.functions.get(name).ok_or_else(|| {
            KernelError::Unsupported(format!("no CUDA kernel named {name} was loaded"))
        })
    }

    /// Launches `name` on `stream` with `grid` × `block` threads and `shared` bytes of dynamic shared memory.
    pub(crate) fn launch(
        &self,
        stream: &CudaStream,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<(), KernelError> {
        let func = self.get(name)?;
        let mut builder = stream.launch_builder(func);
        for a in args {
            match a {
                Arg::Ptr(p) | Arg::U64(p) => builder.arg(p),
                Arg::I32(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: shared,
        };
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(|e| KernelError::Device {
                op: "kernel launch",
                message: format!("{name}: {e:?}"),
            })
    }
}

/// Blocks for a grid-stride loop over `n` elements with 256 threads a block.
pub(crate) fn blocks_for(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 65535 * 8) as u32
}

/// Blocks for the element-wise kernels that move 8 elements per thread (load8/store8 in common.cuh).
pub(crate) fn blocks_for_chunks_of_8(n: usize) -> u32 {
    blocks_for(n.div_ceil(8))
}
