//! SIGINT/SIGTERM sent to the launcher reach every rank. Alone in its test binary because it
//! signals the whole test process; the launcher's handler keeps that signal from killing it.

use launcher::{run, LaunchArgs};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Runs one launch at a time: each test signals the whole process.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn args(nproc: usize, script: String) -> LaunchArgs {
    LaunchArgs {
        nproc_per_node: Some(nproc),
        nnodes: 1,
        node_rank: 0,
        master_addr: None,
        master_port: 29500,
        job_token: Some("signal-test".to_string()),
        grace_seconds: 3.0,
        command: vec!["-c".to_string(), script],
    }
}

/// Starts the launch on a thread, waits until every rank wrote `ready.<rank>`, then sends
/// `signal` to this process; returns the launcher's exit code and how long the launch lasted.
fn launch_then_signal(dir: &Path, nproc: usize, script: String, signal: i32) -> (i32, Duration) {
    let launch = std::thread::spawn(move || run(args(nproc, script), PathBuf::from("/bin/sh")));
    let started = Instant::now();
    while !(0..nproc).all(|r| dir.join(format!("ready.{r}")).exists()) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "ranks never got ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signals this process, whose handler (installed by `run`) records it.
    unsafe { libc::kill(libc::getpid(), signal) };
    let code = launch.join().unwrap().unwrap();
    (code, started.elapsed())
}

#[test]
fn sigterm_reaches_every_rank_which_may_exit_cleanly() {
    let _guard = ONE_AT_A_TIME.lock().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"cd {dir}; trap 'echo "TERM at rank $RANK" > got.$RANK; exit 0' TERM
           touch ready.$RANK
           while true; do sleep 0.05; done"#,
        dir = dir.path().display()
    );
    let (code, took) = launch_then_signal(dir.path(), 2, script, libc::SIGTERM);
    assert_eq!(code, 0, "both ranks trapped TERM and exited 0");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?}: ranks were killed, not signalled"
    );
    for rank in 0..2 {
        let got = std::fs::read_to_string(dir.path().join(format!("got.{rank}"))).unwrap();
        assert_eq!(got.trim(), format!("TERM at rank {rank}"));
    }
}

#[test]
fn sigint_stops_ranks_that_do_not_catch_it_with_code_130() {
    let _guard = ONE_AT_A_TIME.lock().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"cd {dir}; touch ready.$RANK; exec sleep 30"#,
        dir = dir.path().display()
    );
    let (code, took) = launch_then_signal(dir.path(), 3, script, libc::SIGINT);
    assert_eq!(code, 128 + libc::SIGINT);
    assert!(took < Duration::from_secs(3), "took {took:?}");
}
