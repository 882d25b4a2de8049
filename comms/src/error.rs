//! The errors of rank bootstrap, the TCP rendezvous and the collectives, each saying what to do.

use std::time::Duration;

/// Everything that can go wrong while ranks find each other or talk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An environment variable that should hold a number or address does not.
    #[error("environment variable {name}={value:?} is not valid: {why}")]
    BadEnv {
        name: String,
        value: String,
        why: String,
    },
    /// A Slurm host list (`node[01-03,07]`) that cannot be expanded.
    #[error("cannot expand Slurm host list {list:?}: {why}")]
    BadHostList { list: String, why: String },
    /// Rank 0's address is needed but nothing said where it is.
    #[error(
        "ranks span {nodes} nodes but MASTER_ADDR is not set: export MASTER_ADDR=<host of rank 0> \
         (and MASTER_PORT) on every node, or build with the `mpi` feature to share the id by MPI"
    )]
    NoMasterAddr { nodes: usize },
    /// The rendezvous at rank 0 could not be reached, or not all ranks came, before the deadline.
    #[error("rendezvous at {addr} timed out after {waited:?}: {detail}")]
    RendezvousTimeout {
        addr: String,
        waited: Duration,
        detail: String,
    },
    /// Rank 0 refused this rank (wrong job token, bad rank) or answered something unreadable.
    #[error("rendezvous at {addr} refused: {why}")]
    RendezvousRefused { addr: String, why: String },
    /// A socket error other than a timeout.
    #[error("rendezvous at {addr}: {source}")]
    RendezvousIo {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// Two ranks disagree on a buffer or the world does not match what the launcher said.
    #[error("{0}")]
    Mismatch(String),
    /// The build lacks the engine this run needs.
    #[error("{0}")]
    Unsupported(String),
    /// MPI reported a failure or could not start.
    #[error("MPI: {0}")]
    Mpi(String),
    /// NCCL or the CUDA driver reported a failure.
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
