//! Ranks and collectives for data-parallel training.
//!
//! - [`bootstrap`]: who am I — rank, world size, local rank, rank 0's address — from our
//!   launcher, torchrun, mpirun or Slurm.
//! - [`hostlist`]: Slurm's compressed host and tasks-per-node lists, expanded.
//! - [`rendezvous`]: rank 0 hands a payload (the NCCL unique id) to the others over TCP.
//! - [`Communicator`]: all-reduce, broadcast, barrier over host buffers, with engines
//!   [`SingleProcess`], `MpiCommunicator` (feature `mpi`) and `NcclCommunicator` (feature
//!   `nccl`, which adds all-reduce on device buffers).
//! - [`connect`]: picks the engine for this run.

pub mod bootstrap;
mod communicator;
mod connect;
mod error;
pub mod hostlist;
#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(feature = "nccl")]
mod nccl_comm;
pub mod rendezvous;
mod single;

pub use bootstrap::{detect, RankInfo, Source};
pub use communicator::{Communicator, ReduceOp};
pub use connect::{connect, Comms, Placement};
pub use error::{Error, Result};
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiCommunicator;
#[cfg(feature = "nccl")]
pub use nccl_comm::{nccl_loadable, NcclCommunicator, NCCL_ID_BYTES};
pub use rendezvous::{Rendezvous, RendezvousServer};
pub use single::SingleProcess;
