//! Starts the ranks, watches them, and tears them down together.
//!
//! Each rank runs in its own process group (so a signal reaches the whole rank, including any
//! process it starts) and dies with the launcher (`PR_SET_PDEATHSIG`), so the launcher being
//! killed leaves no orphan either. The watch loop, every 20 ms:
//! - forwards SIGINT/SIGTERM received by the launcher to every live rank, then gives them the
//!   grace period before SIGKILL; a second signal SIGKILLs at once;
//! - reaps ranks that exited and SIGKILLs whatever is left in their process groups;
//! - on the first rank that exits non-zero or dies, SIGTERMs the others, SIGKILLs them after the
//!   grace period, and later returns that rank's code (128 + signal for a death by signal).

use crate::args::Layout;
use crate::output::{pump_lines, Sinks};
use crate::LaunchError;
use signal_hook::consts::{SIGINT, SIGKILL, SIGTERM};
use signal_hook::SigId;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the watch loop looks at the ranks and the signal flag.
const POLL: Duration = Duration::from_millis(20);
/// How long to wait for the last output of the ranks after they are gone.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Runs `program command...` as every rank of `layout` on this node; returns the exit code of
/// the first rank that failed, or 0 when all succeeded.
pub(crate) fn run_ranks(
    layout: &Layout,
    program: &Path,
    command: &[String],
    sinks: Sinks,
) -> Result<i32, LaunchError> {
    let signals = SignalWatch::install()?;
    let (pumped_tx, pumped_rx) = mpsc::channel();
    let mut pumps = 0;
    let mut ranks: Vec<Rank> = Vec::new();
    for local_rank in 0..layout.nproc_per_node {
        let rank = layout.rank(local_rank);
        let mut child = match spawn_rank(layout, local_rank, program, command) {
            Ok(child) => child,
            Err(source) => {
                stop_all(&mut ranks, Duration::ZERO);
                return Err(LaunchError::Spawn {
                    rank,
                    program: program.display().to_string(),
                    source,
                });
            }
        };
        if let Some(stdout) = child.stdout.take() {
            pump_lines(stdout, rank, sinks.stdout.clone(), pumped_tx.clone());
            pumps += 1;
        }
        if let Some(stderr) = child.stderr.take() {
            pump_lines(stderr, rank, sinks.stderr.clone(), pumped_tx.clone());
            pumps += 1;
        }
        ranks.push(Rank {
            rank,
            child,
            code: None,
        });
    }
    let code = watch(&mut ranks, &signals, layout.grace, &sinks);
    let drain_until = Instant::now() + OUTPUT_DRAIN;
    for _ in 0..pumps {
        let left = drain_until.saturating_duration_since(Instant::now());
        if pumped_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    code
}

/// One started rank.
struct Rank {
    rank: usize,
    child: Child,
    /// Exit code once reaped.
    code: Option<i32>,
}

impl Rank {
    fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) on our child's process group; an already empty group gives ESRCH.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), signal);
        }
    }
}

/// Starts rank `local_rank` in its own process group with its environment.
fn spawn_rank(
    layout: &Layout,
    local_rank: usize,
    program: &Path,
    command: &[String],
) -> std::io::Result<Child> {
    let mut cmd = Command::new(program);
    cmd.args(command)
        .envs(layout.rank_env(local_rank))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0);
    // Rank 0 writes its progress bar straight to the terminal.
    if layout.rank(local_rank) == 0 {
        cmd.stderr(Stdio::inherit());
    } else {
        cmd.stderr(Stdio::piped());
    }
    // SAFETY: getpid before the fork; only async-signal-safe calls (prctl, getppid, raise) in
    // the child between fork and exec.
    let launcher = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher died between fork and prctl: follow it now.
            if libc::getppid() != launcher {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// The watch loop (see the module doc); returns the launcher's exit code.
fn watch(
    ranks: &mut [Rank],
    signals: &SignalWatch,
    grace: Duration,
    sinks: &Sinks,
) -> Result<i32, LaunchError> {
    let mut failure: Option<i32> = None;
    let mut forwarded = false;
    let mut terminated = false;
    let mut kill_at: Option<Instant> = None;
    loop {
        if let Some(signal) = signals.take() {
            if forwarded {
                say(
                    sinks,
                    &format!("second {}: killing every rank", signal_label(signal)),
                );
                stop_all(ranks, Duration::ZERO);
            } else {
                say(
                    sinks,
                    &format!("{}: passing it to every rank", signal_label(signal)),
                );
                live(ranks).for_each(|r| r.signal_group(signal));
                forwarded = true;
                kill_at.get_or_insert(Instant::now() + grace);
            }
        }
        for rank in live(ranks) {
            let Some(status) = rank.child.try_wait().map_err(|source| LaunchError::Os {
                what: format!("waiting for rank {}", rank.rank),
                source,
            })?
            else {
                continue;
            };
            let code = exit_code(status);
            rank.code = Some(code);
            // Whatever the rank started and left behind goes with it.
            rank.signal_group(SIGKILL);
            if code != 0 && failure.is_none() {
                failure = Some(code);
                let what = describe(status);
                say(
                    sinks,
                    &format!("rank {} {what}; stopping the other ranks", rank.rank),
                );
                kill_at.get_or_insert(Instant::now() + grace);
            }
        }
        if ranks.iter().all(|r| r.code.is_some()) {
            return Ok(failure.unwrap_or(0));
        }
        match kill_at {
            Some(at) if Instant::now() >= at => live(ranks).for_each(|r| r.signal_group(SIGKILL)),
            // The first failure: ask the others to stop, once.
            Some(_) if failure.is_some() && !std::mem::replace(&mut terminated, true) => {
                live(ranks).for_each(|r| r.signal_group(SIGTERM))
            }
            _ => {}
        }
        std::thread::sleep(POLL);
    }
}

fn live(ranks: &mut [Rank]) -> impl Iterator<Item = &mut Rank> {
    ranks.iter_mut().filter(|r| r.code.is_none())
}

/// SIGTERMs every live rank, SIGKILLs it after `grace`, and reaps it.
fn stop_all(ranks: &mut [Rank], grace: Duration) {
    let kill_at = Instant::now() + grace;
    let mut signal = if grace.is_zero() { SIGKILL } else { SIGTERM };
    while ranks.iter().any(|r| r.code.is_none()) {
        for rank in live(ranks) {
            rank.signal_group(signal);
            if let Ok(Some(status)) = rank.child.try_wait() {
                rank.code = Some(exit_code(status));
            }
        }
        if Instant::now() >= kill_at {
            signal = SIGKILL;
        }
        std::thread::sleep(POLL);
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed the process.
fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) if signal == SIGKILL => {
            "was killed by SIGKILL (out of memory?)".to_string()
        }
        (None, Some(signal)) => format!("was killed by {}", signal_label(signal)),
        (None, None) => "ended without a status".to_string(),
    }
}

fn signal_label(signal: i32) -> String {
    signal_hook::low_level::signal_name(signal)
        .map(str::to_string)
        .unwrap_or_else(|| format!("signal {signal}"))
}

/// A launcher status line on stderr.
fn say(sinks: &Sinks, message: &str) {
    if let Ok(mut err) = sinks.stderr.lock() {
        let _ = writeln!(err, "fuselora launch: {message}");
    }
}

/// SIGINT and SIGTERM caught while the ranks run, instead of killing the launcher.
struct SignalWatch {
    received: Arc<AtomicUsize>,
    ids: Vec<SigId>,
}

impl SignalWatch {
    fn install() -> Result<SignalWatch, LaunchError> {
        let received = Arc::new(AtomicUsize::new(0));
        let mut ids = Vec::new();
        for signal in [SIGINT, SIGTERM] {
            let id = signal_hook::flag::register_usize(signal, received.clone(), signal as usize)
                .map_err(|source| LaunchError::Os {
                what: format!("catching {}", signal_label(signal)),
                source,
            })?;
            ids.push(id);
        }
        Ok(SignalWatch { received, ids })
    }

    /// The signal received since the last call, if any.
    fn take(&self) -> Option<i32> {
        match self.received.swap(0, Ordering::SeqCst) {
            0 => None,
            signal => Some(signal as i32),
        }
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A layout of `nproc` ranks on node `node_rank` of `nnodes`, with a short grace period.
    fn layout(nproc: usize, nnodes: usize, node_rank: usize) -> Layout {
        Layout {
            nproc_per_node: nproc,
            nnodes,
            node_rank,
            master_addr: "10.1.2.3".to_string(),
            master_port: 29611,
            job_token: "tok42".to_string(),
            grace: Duration::from_millis(500),
        }
    }

    /// Runs `sh -c script` as every rank, capturing the prefixed stdout and stderr.
    fn run_sh(layout: &Layout, script: &str) -> (i32, String, String, Duration) {
        let stdout = Arc::new(Mutex::new(Vec::<u8>::new()));
        let stderr = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sinks = Sinks {
            stdout: stdout.clone(),
            stderr: stderr.clone(),
        };
        let command = ["-c".to_string(), script.to_string()];
        let started = Instant::now();
        let code = run_ranks(layout, Path::new("/bin/sh"), &command, sinks).unwrap();
        let text =
            |buf: &Arc<Mutex<Vec<u8>>>| String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        (code, text(&stdout), text(&stderr), started.elapsed())
    }

    fn sorted_lines(text: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        lines
    }

    /// True while `pid` is a live process (a zombie waiting for its reaper counts as gone).
    fn is_running(pid: i32) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        let exists = unsafe { libc::kill(pid, 0) } == 0;
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z'))
            })
            .unwrap_or(false);
        exists && !zombie
    }

    fn read_pids(dir: &Path, names: &[&str]) -> Vec<i32> {
        names
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(dir.join(name)).unwrap();
                text.trim().parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn ranks_get_their_environment() {
        let script = r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $GROUP_RANK $MASTER_ADDR:$MASTER_PORT $FUSELORA_JOB_TOKEN""#;
        let (code, stdout, _, _) = run_sh(&layout(2, 2, 1), script);
        assert_eq!(code, 0);
        assert_eq!(
            sorted_lines(&stdout),
            [
                "[rank 2] 2 4 0 2 1 10.1.2.3:29611 tok42",
                "[rank 3] 3 4 1 2 1 10.1.2.3:29611 tok42",
            ]
        );
    }

    #[test]
    fn output_lines_carry_the_rank_and_rank_0_stderr_stays_raw() {
        let script = r#"echo "first $RANK"; echo "warn $RANK" >&2; printf "last $RANK""#;
        let (code, stdout, stderr, _) = run_sh(&layout(3, 1, 0), script);
        assert_eq!(code, 0);
        assert_eq!(
            sorted_lines(&stdout),
            [
                "[rank 0] first 0",
                "[rank 0] last 0",
                "[rank 1] first 1",
                "[rank 1] last 1",
                "[rank 2] first 2",
                "[rank 2] last 2",
            ]
        );
        // Rank 0's stderr goes to the terminal untouched, not through the prefixing pipe.
        assert_eq!(
            sorted_lines(&stderr),
            ["[rank 1] warn 1", "[rank 2] warn 2"]
        );
        // Lines of one rank keep their order.
        let rank1: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("[rank 1]"))
            .collect();
        assert_eq!(rank1, ["[rank 1] first 1", "[rank 1] last 1"]);
    }

    #[test]
    fn one_failing_rank_stops_the_others_and_gives_its_code() {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            r#"cd {dir}; echo $$ > sh.$RANK
               if [ "$RANK" = 1 ]; then sleep 0.3; exit 3; fi
               sleep 30 & echo $! > sleep.$RANK; wait"#,
            dir = dir.path().display()
        );
        let (code, _, stderr, took) = run_sh(&layout(3, 1, 0), &script);
        assert_eq!(code, 3);
        assert!(took < Duration::from_secs(5), "teardown took {took:?}");
        assert!(
            stderr.contains("rank 1 exited with code 3; stopping the other ranks"),
            "{stderr}"
        );
        for pid in read_pids(dir.path(), &["sh.0", "sh.1", "sh.2", "sleep.0", "sleep.2"]) {
            assert!(!is_running(pid), "process {pid} outlived the launcher");
        }
    }

    #[test]
    fn a_rank_that_ignores_sigterm_is_killed_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            r#"cd {dir}
               if [ "$RANK" = 1 ]; then sleep 0.3; exit 4; fi
               trap '' TERM; echo $$ > stubborn
               while true; do sleep 0.05; done"#,
            dir = dir.path().display()
        );
        let (code, _, _, took) = run_sh(&layout(2, 1, 0), &script);
        assert_eq!(code, 4);
        // 0.3 s before the failure, 0.5 s of grace, then SIGKILL.
        assert!(
            took >= Duration::from_millis(800),
            "killed before the grace period: {took:?}"
        );
        assert!(took < Duration::from_secs(4), "teardown took {took:?}");
        assert!(!is_running(read_pids(dir.path(), &["stubborn"])[0]));
    }

    #[test]
    fn a_rank_killed_by_a_signal_reports_128_plus_the_signal() {
        let script = r#"if [ "$RANK" = 1 ]; then kill -9 $$; fi; sleep 30"#;
        let (code, _, stderr, took) = run_sh(&layout(2, 1, 0), script);
        assert_eq!(code, 128 + 9);
        assert!(stderr.contains("rank 1 was killed by SIGKILL"), "{stderr}");
        assert!(took < Duration::from_secs(5), "teardown took {took:?}");
    }

    #[test]
    fn all_ranks_succeeding_returns_0_after_the_slowest() {
        let (code, stdout, _, took) =
            run_sh(&layout(2, 1, 0), r#"sleep 0.$((RANK * 4)); echo done"#);
        assert_eq!(code, 0);
        assert_eq!(sorted_lines(&stdout), ["[rank 0] done", "[rank 1] done"]);
        assert!(
            took >= Duration::from_millis(400),
            "returned before rank 1 finished: {took:?}"
        );
    }

    #[test]
    fn a_program_that_cannot_start_is_named() {
        let sinks = Sinks::process();
        let err = run_ranks(
            &layout(2, 1, 0),
            Path::new("/nonexistent/fuselora"),
            &[],
            sinks,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cannot start rank 0 (/nonexistent/fuselora)"),
            "{err}"
        );
    }
}
