//! The communicator factory: from a [`RankInfo`] and where the buffers live, picks the engine.
//!
//! | ranks | buffers | engine |
//! | --- | --- | --- |
//! | 1 | any | [`SingleProcess`] |
//! | >1 | host (CPU ranks) | MPI (feature `mpi`; started by mpirun or `srun --mpi=pmix`) |
//! | >1 | CUDA | NCCL (feature `nccl`); its unique id travels by MPI broadcast when started by mpirun and built with `mpi`, else over the TCP rendezvous at `MASTER_ADDR:MASTER_PORT` |

use crate::bootstrap::RankInfo;
#[cfg(feature = "mpi")]
use crate::bootstrap::Source;
use crate::{Communicator, Error, ReduceOp, Result, SingleProcess};
use half::bf16;
use std::time::Duration;

#[cfg(feature = "mpi")]
use crate::MpiCommunicator;
#[cfg(feature = "nccl")]
use crate::{NcclCommunicator, NCCL_ID_BYTES};

/// Where the buffers handed to collectives live.
pub enum Placement {
    /// Host memory: CPU ranks.
    Host,
    /// The GPU of this stream (bind it with `CudaContext::new(info.local_rank)`).
    #[cfg(feature = "nccl")]
    Cuda(std::sync::Arc<cudarc::driver::CudaStream>),
}

/// The communicator [`connect`] chose.
pub enum Comms {
    /// One rank.
    Single(SingleProcess),
    /// CPU ranks under MPI.
    #[cfg(feature = "mpi")]
    Mpi(MpiCommunicator),
    /// GPU ranks under NCCL.
    #[cfg(feature = "nccl")]
    Nccl {
        nccl: NcclCommunicator,
        /// MPI stays initialised while NCCL runs when it carried the id (dropped after NCCL).
        #[cfg(feature = "mpi")]
        mpi_session: Option<MpiCommunicator>,
    },
}

/// Connects this rank to the others; blocks until all have joined or `timeout` passes.
#[cfg_attr(not(feature = "nccl"), allow(unused_variables))]
pub fn connect(info: &RankInfo, placement: Placement, timeout: Duration) -> Result<Comms> {
    if info.world_size == 1 {
        return Ok(Comms::Single(SingleProcess));
    }
    match placement {
        Placement::Host => connect_host(info),
        #[cfg(feature = "nccl")]
        Placement::Cuda(stream) => connect_nccl(info, stream, timeout),
    }
}

#[cfg(feature = "mpi")]
fn connect_host(info: &RankInfo) -> Result<Comms> {
    Ok(Comms::Mpi(init_mpi(info)?))
}

#[cfg(not(feature = "mpi"))]
fn connect_host(info: &RankInfo) -> Result<Comms> {
    Err(Error::Unsupported(format!(
        "{} CPU ranks exchange gradients through MPI, but this build has no MPI: rebuild with \
         `--features mpi` (needs libopenmpi-dev) and start the ranks with mpirun",
        info.world_size
    )))
}

/// Initialises MPI and checks that its world is the one the environment described.
#[cfg(feature = "mpi")]
fn init_mpi(info: &RankInfo) -> Result<MpiCommunicator> {
    if !matches!(info.source, Source::Mpi | Source::Slurm) {
        return Err(Error::Unsupported(format!(
            "{} ranks were not started by mpirun or srun, so MPI cannot connect them: \
             start CPU ranks with `mpirun -np {} fuselora train ...`",
            info.world_size, info.world_size
        )));
    }
    let mpi = MpiCommunicator::init()?;
    if (mpi.rank(), mpi.world_size()) != (info.rank, info.world_size) {
        return Err(Error::Mismatch(format!(
            "MPI says rank {} of {} but the environment says rank {} of {}: under Slurm use \
             `srun --mpi=pmix` so the ranks share one MPI world",
            mpi.rank(),
            mpi.world_size(),
            info.rank,
            info.world_size
        )));
    }
    Ok(mpi)
}

#[cfg(feature = "nccl")]
fn connect_nccl(
    info: &RankInfo,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    timeout: Duration,
) -> Result<Comms> {
    #[cfg(feature = "mpi")]
    if info.source == Source::Mpi {
        let mpi = init_mpi(info)?;
        let mut id = [0u8; NCCL_ID_BYTES];
        if info.rank == 0 {
            id = NcclCommunicator::new_unique_id()?;
        }
        mpi.broadcast(&mut id, 0)?;
        let nccl = NcclCommunicator::init(stream, info.rank, info.world_size, &id)?;
        return Ok(Comms::Nccl {
            nccl,
            mpi_session: Some(mpi),
        });
    }
    let id = share_nccl_id(info, timeout)?;
    Ok(Comms::Nccl {
        nccl: NcclCommunicator::init(stream, info.rank, info.world_size, &id)?,
        #[cfg(feature = "mpi")]
        mpi_session: None,
    })
}

/// Rank 0 makes the NCCL id and serves it on all interfaces at `MASTER_PORT`; the others fetch
/// it from `MASTER_ADDR:MASTER_PORT`.
#[cfg(feature = "nccl")]
fn share_nccl_id(info: &RankInfo, timeout: Duration) -> Result<[u8; NCCL_ID_BYTES]> {
    use crate::rendezvous::{Rendezvous, RendezvousServer};
    if info.rank == 0 {
        let id = NcclCommunicator::new_unique_id()?;
        let server = RendezvousServer::bind(&format!("0.0.0.0:{}", info.master_port))?;
        server.serve(&info.job_token, info.world_size, &id, timeout)?;
        return Ok(id);
    }
    let endpoint = info.master_endpoint()?;
    let bytes = Rendezvous::fetch(&endpoint, &info.job_token, info.rank, timeout)?;
    bytes
        .try_into()
        .map_err(|bytes: Vec<u8>| Error::RendezvousRefused {
            addr: endpoint,
            why: format!(
                "sent {} bytes, not a {NCCL_ID_BYTES}-byte NCCL id",
                bytes.len()
            ),
        })
}

impl Comms {
    /// The NCCL communicator, whose device methods reduce gradients on the GPU.
    #[cfg(feature = "nccl")]
    pub fn nccl(&self) -> Option<&NcclCommunicator> {
        match self {
            Comms::Nccl { nccl, .. } => Some(nccl),
            _ => None,
        }
    }

    fn engine(&self) -> &dyn Communicator {
        match self {
            Comms::Single(single) => single,
            #[cfg(feature = "mpi")]
            Comms::Mpi(mpi) => mpi,
            #[cfg(feature = "nccl")]
            Comms::Nccl { nccl, .. } => nccl,
        }
    }
}

impl Communicator for Comms {
    fn rank(&self) -> usize {
        self.engine().rank()
    }

    fn world_size(&self) -> usize {
        self.engine().world_size()
    }

    fn describe(&self) -> String {
        self.engine().describe()
    }

    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.engine().all_reduce_f32(buf, op)
    }

    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        self.engine().all_reduce_bf16(buf, op)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.engine().broadcast(buf, root)
    }

    fn barrier(&self) -> Result<()> {
        self.engine().barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(not(feature = "mpi"))]
    use crate::bootstrap::Source;

    #[test]
    fn one_rank_is_a_single_process() {
        let comms = connect(&RankInfo::single(), Placement::Host, Duration::from_secs(1)).unwrap();
        assert!(matches!(comms, Comms::Single(_)));
        assert_eq!((comms.rank(), comms.world_size()), (0, 1));
        let mut loss = [2.5f32];
        comms.all_reduce_f32(&mut loss, ReduceOp::Average).unwrap();
        assert_eq!(loss, [2.5]);
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn several_cpu_ranks_without_mpi_say_how_to_get_it() {
        let info = RankInfo {
            rank: 1,
            world_size: 2,
            local_rank: 1,
            local_world_size: 2,
            source: Source::Launcher,
            ..RankInfo::single()
        };
        let err = connect(&info, Placement::Host, Duration::from_secs(1))
            .err()
            .expect("two CPU ranks without MPI cannot connect")
            .to_string();
        assert!(
            err.contains("--features mpi") && err.contains("mpirun"),
            "{err}"
        );
    }
}
