//! The communicator of a run with one rank: every collective is the identity.

use crate::{Communicator, Error, ReduceOp, Result};
use half::bf16;

/// A world of one process. All-reduce (sum or average over one rank) and broadcast leave the
/// buffer as it is; barrier returns at once.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn describe(&self) -> String {
        "single process".to_string()
    }

    fn all_reduce_f32(&self, _buf: &mut [f32], _op: ReduceOp) -> Result<()> {
        Ok(())
    }

    fn all_reduce_bf16(&self, _buf: &mut [bf16], _op: ReduceOp) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::Mismatch(format!(
                "broadcast from rank {root} in a world of 1 rank"
            )));
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_leave_buffers_unchanged() {
        let comm = SingleProcess;
        let mut grads = vec![1.5f32, -2.0, 3.25];
        comm.all_reduce_f32(&mut grads, ReduceOp::Average).unwrap();
        assert_eq!(grads, [1.5, -2.0, 3.25]);
        let mut half_grads = vec![bf16::from_f32(0.5), bf16::from_f32(-4.0)];
        comm.all_reduce_bf16(&mut half_grads, ReduceOp::Sum)
            .unwrap();
        assert_eq!(half_grads, [bf16::from_f32(0.5), bf16::from_f32(-4.0)]);
        let mut bytes = [7u8, 8, 9];
        comm.broadcast(&mut bytes, 0).unwrap();
        assert_eq!(bytes, [7, 8, 9]);
        comm.barrier().unwrap();
        assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    }

    #[test]
    fn broadcast_from_a_rank_that_does_not_exist_is_refused() {
        let err = SingleProcess.broadcast(&mut [0u8; 4], 1).unwrap_err();
        assert!(err.to_string().contains("rank 1"), "{err}");
    }
}
