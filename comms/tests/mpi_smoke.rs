//! Runs `examples/mpi_allreduce` under a real `mpirun -np 3` and checks every rank's verdict.
//! Needs Open MPI (`apt-get install -y openmpi-bin libopenmpi-dev`) and `--features mpi`;
//! `cargo test -p comms --features mpi` builds the example before running this.
#![cfg(feature = "mpi")]

use std::path::PathBuf;
use std::process::Command;

/// target/<profile>/examples/mpi_allreduce, next to this test's target/<profile>/deps/.
fn example_binary() -> PathBuf {
    let test_exe = std::env::current_exe().unwrap();
    let profile_dir = test_exe.parent().and_then(|deps| deps.parent()).unwrap();
    let binary = profile_dir.join("examples").join("mpi_allreduce");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo test -p comms --features mpi` so cargo builds the example",
        binary.display()
    );
    binary
}

#[test]
fn three_ranks_all_reduce_under_mpirun() {
    let output = Command::new("mpirun")
        .args(["-np", "3", "--oversubscribe"])
        .arg(example_binary())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun not found: apt-get install -y openmpi-bin");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "mpirun failed: {stdout}\n{stderr}");
    for rank in 0..3 {
        let verdict = format!("rank {rank} of 3: all-reduce ok (mpi (3 ranks))");
        assert!(
            stdout.contains(&verdict),
            "no {verdict:?} in:\n{stdout}\n{stderr}"
        );
    }
}
