//! Choosing the backend a command runs on: `auto` takes the CUDA backend when this build has it
//! (`--features cuda`) and a GPU opens, else the CPU; `cpu` and `cuda` force one. The GPU is the
//! rank's local GPU (its local rank under `fuselora launch`, torchrun, mpirun or srun) or 0.
//! The choice and its reason are printed to stderr, so a run on the wrong device is never silent.

#[cfg(not(feature = "cuda"))]
use anyhow::bail;
use anyhow::Result;
use kernels::cpu::CpuBackend;
use kernels::{Backend, DType};
use trainer::train::config::{BackendKind, ComputeDType};
use trainer::train::grad_reduce::GradReducer;

/// Work that runs on whichever backend was chosen (a generic closure, which Rust lacks).
pub trait BackendTask {
    type Output;
    fn run<B: GradReducer>(self, be: &B) -> Result<Self::Output>;
}

/// The `model.backend` / `--backend` and `model.dtype` / `--dtype` values.
#[derive(Clone, Copy, Debug)]
pub struct Selection {
    pub backend: BackendKind,
    pub dtype: ComputeDType,
}

/// The device ordinal this process uses: its local rank on this node, read like the rank bootstrap
/// reads it (our launcher / torchrun's `LOCAL_RANK`, Open MPI's `OMPI_COMM_WORLD_LOCAL_RANK`, PMI,
/// Slurm's `SLURM_LOCALID`), else 0.
#[cfg(feature = "cuda")]
fn local_device() -> Result<usize> {
    use anyhow::Context;
    Ok(comms::detect()
        .context("reading this rank's local GPU")?
        .local_rank)
}

/// Runs `task` on the backend `sel` asks for, printing which one and why.
pub fn run_on<T: BackendTask>(sel: &Selection, task: T) -> Result<T::Output> {
    let dtype = sel.dtype.dtype();
    match sel.backend {
        BackendKind::Cpu => on_cpu("asked for", task),
        BackendKind::Cuda => on_cuda(dtype, task, true),
        BackendKind::Auto => on_cuda(dtype, task, false),
    }
}

fn on_cpu<T: BackendTask>(reason: &str, task: T) -> Result<T::Output> {
    let be = CpuBackend::new();
    eprintln!("backend: {} — {reason}", be.describe());
    task.run(&be)
}

#[cfg(feature = "cuda")]
fn on_cuda<T: BackendTask>(dtype: DType, task: T, required: bool) -> Result<T::Output> {
    use anyhow::Context;
    let device = local_device()?;
    match kernels::cuda::CudaBackend::new(device, dtype) {
        Ok(be) => {
            let why = if required {
                "asked for"
            } else {
                "auto: a GPU is present"
            };
            eprintln!("backend: {} — {why}", be.describe());
            if let Ok(libraries) = kernels::cuda::libraries::load() {
                eprintln!("cuda: {}", libraries.describe());
            }
            task.run(&be)
        }
        Err(e) if !required => on_cpu(
            &format!("auto: the CUDA backend could not open GPU {device}: {e}"),
            task,
        ),
        Err(e) => Err(e).with_context(|| format!("backend = \"cuda\": cannot open GPU {device}")),
    }
}

#[cfg(not(feature = "cuda"))]
fn on_cuda<T: BackendTask>(_dtype: DType, task: T, required: bool) -> Result<T::Output> {
    if required {
        bail!("backend = \"cuda\", but this build has no CUDA backend: rebuild with `cargo build --release -p trainer --features cuda`");
    }
    on_cpu(
        "auto: this build has no CUDA backend (build with --features cuda for GPUs)",
        task,
    )
}
