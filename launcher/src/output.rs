//! Rank output, prefixed: every line a rank writes to a pipe is copied to the launcher's
//! stream as `[rank r] line`, whole lines at a time so ranks never interleave within a line.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A shared destination for prefixed lines (the launcher's stdout or stderr).
pub(crate) type Sink = Arc<Mutex<dyn Write + Send>>;

/// Where the ranks' stdout and (except rank 0's) stderr lines go.
#[derive(Clone)]
pub(crate) struct Sinks {
    pub stdout: Sink,
    pub stderr: Sink,
}

impl Sinks {
    /// The launcher's own stdout and stderr.
    pub fn process() -> Sinks {
        Sinks {
            stdout: Arc::new(Mutex::new(std::io::stdout())),
            stderr: Arc::new(Mutex::new(std::io::stderr())),
        }
    }
}

/// The prefix of rank `rank`'s lines.
pub(crate) fn prefix(rank: usize) -> String {
    format!("[rank {rank}] ")
}

/// Copies `source` into `sink` line by line with the rank prefix until end of file, then
/// reports on `finished`. A last line without a newline gets one. When the sink fails (the
/// launcher's stdout closed) the pipe is still drained so the rank never blocks on it.
pub(crate) fn pump_lines(
    source: impl Read + Send + 'static,
    rank: usize,
    sink: Sink,
    finished: Sender<()>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(source);
        let prefix = prefix(rank);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            if let Ok(mut out) = sink.lock() {
                let _ = out
                    .write_all(prefix.as_bytes())
                    .and_then(|_| out.write_all(&line))
                    .and_then(|_| out.flush());
            }
        }
        let _ = finished.send(());
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_gets_the_prefix_and_a_trailing_line_its_newline() {
        let captured = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink: Sink = captured.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let source = std::io::Cursor::new(b"step 1 loss 2.5\n\nstep 2 loss 2.25".to_vec());
        pump_lines(source, 3, sink, done_tx).join().unwrap();
        done_rx.recv().unwrap();
        let text = String::from_utf8(captured.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "[rank 3] step 1 loss 2.5\n[rank 3] \n[rank 3] step 2 loss 2.25\n"
        );
    }
}
