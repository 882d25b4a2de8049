//! The communicator of CPU ranks started by mpirun (or srun with PMI): MPI_Allreduce,
//! MPI_Bcast and MPI_Barrier on MPI_COMM_WORLD through the `mpi` crate (rsmpi).
//!
//! rsmpi has no in-place all-reduce, so each call sends a copy of the buffer and receives into
//! the buffer itself. MPI has no bf16 type: bf16 buffers are widened to f32, reduced, and rounded
//! back, which is also what keeps the sum of many bf16 gradients accurate. Average = sum / W,
//! as torch's DistributedDataParallel computes it.

use crate::{Communicator, Error, ReduceOp, Result};
use ::mpi::collective::SystemOperation;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};
use half::bf16;

/// MPI_COMM_WORLD of this process; MPI is finalised when it is dropped.
pub struct MpiCommunicator {
    world: SimpleCommunicator,
    _universe: Universe,
}

impl MpiCommunicator {
    /// Initialises MPI (once per process) and takes its world.
    pub fn init() -> Result<MpiCommunicator> {
        let universe = ::mpi::initialize().ok_or_else(|| {
            Error::Mpi("MPI is already initialised in this process; create one communicator".into())
        })?;
        Ok(MpiCommunicator {
            world: universe.world(),
            _universe: universe,
        })
    }

    fn divide_for(&self, op: ReduceOp) -> Option<f32> {
        match op {
            ReduceOp::Sum => None,
            ReduceOp::Average => Some(self.world_size() as f32),
        }
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn describe(&self) -> String {
        format!("mpi ({} ranks)", self.world_size())
    }

    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        if let Some(world) = self.divide_for(op) {
            buf.iter_mut().for_each(|x| *x /= world);
        }
        Ok(())
    }

    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        let mut wide: Vec<f32> = buf.iter().map(|x| x.to_f32()).collect();
        self.all_reduce_f32(&mut wide, op)?;
        for (dst, src) in buf.iter_mut().zip(wide) {
            *dst = bf16::from_f32(src);
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(Error::Mismatch(format!(
                "broadcast from rank {root} in a world of {} ranks",
                self.world_size()
            )));
        }
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
}
