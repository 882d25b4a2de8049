//! The errors of `fuselora launch`, each saying what to change.

/// Why the launcher could not start or supervise the ranks.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Flags that contradict each other.
    #[error("{0}")]
    BadArgs(String),
    /// A rank could not be started.
    #[error("cannot start rank {rank} ({program}): {source}")]
    Spawn {
        rank: usize,
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The operating system refused a signal handler or a wait.
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
