//! A small TCP rendezvous: rank 0 serves a payload (the 128-byte NCCL unique id, or any bytes)
//! and every other rank fetches it, proving with the job token that it belongs to this job.
//!
//! Wire format, both ways: a frame is a 4-byte big-endian length then that many bytes, at most
//! [`MAX_FRAME`]. The request is `MAGIC ++ rank (u32 BE) ++ token`; the answer is `0 ++ payload`
//! when accepted or `1 ++ reason (UTF-8)` when refused; an accepted rank confirms with the frame
//! `ACK`, and only confirmed ranks count as served (an answer lost with its connection is simply
//! asked for again). Rank 0 handles one connection at a time
//! with short socket timeouts, so garbage, oversized frames or a silent peer cost it at most
//! [`PEER_TIMEOUT`] and never stop it; it returns once every rank 1..W has been served.

use crate::{Error, Result};
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Largest frame either side accepts, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;
/// How long rank 0 waits on one connection before dropping it.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// First bytes of every request: protocol name and version.
const MAGIC: &[u8; 8] = b"FLRDZV01";
/// The frame a rank sends once it holds the payload.
const ACK: &[u8] = b"ACK";
const ACCEPTED: u8 = 0;
const REFUSED: u8 = 1;
/// Pause between connection attempts while rank 0 is not up yet.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Rank 0's side: a bound listening socket.
pub struct RendezvousServer {
    listener: TcpListener,
    addr: String,
}

impl RendezvousServer {
    /// Listens on `bind` (`host:port`; port 0 picks a free one).
    pub fn bind(bind: &str) -> Result<RendezvousServer> {
        let listener = TcpListener::bind(bind).map_err(|source| Error::RendezvousIo {
            addr: bind.to_string(),
            source: std::io::Error::new(
                source.kind(),
                format!(
                    "cannot listen ({source}); is another job using this port? \
                     pick another MASTER_PORT"
                ),
            ),
        })?;
        let addr = match listener.local_addr() {
            Ok(local) => local.to_string(),
            Err(_) => bind.to_string(),
        };
        Ok(RendezvousServer { listener, addr })
    }

    /// The address actually bound (with the chosen port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|source| self.io(source))
    }

    /// Hands `payload` to each of ranks 1..`world_size` that presents `token`; returns when all
    /// have it, or fails after `timeout` naming the ranks that never came.
    pub fn serve(
        &self,
        token: &str,
        world_size: usize,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<()> {
        if payload.len() + 1 > MAX_FRAME {
            return Err(Error::Mismatch(format!(
                "rendezvous payload of {} bytes exceeds the {MAX_FRAME}-byte frame limit",
                payload.len()
            )));
        }
        let started = Instant::now();
        let deadline = started + timeout;
        let mut served = BTreeSet::new();
        let mut last_refusal = None;
        self.listener
            .set_nonblocking(true)
            .map_err(|source| self.io(source))?;
        while served.len() + 1 < world_size {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (1..world_size).filter(|r| !served.contains(r)).collect();
                let refused = match &last_refusal {
                    Some(why) => format!("; last refused connection: {why}"),
                    None => String::new(),
                };
                return Err(Error::RendezvousTimeout {
                    addr: self.addr.clone(),
                    waited: started.elapsed(),
                    detail: format!("ranks {missing:?} never fetched the id{refused}"),
                });
            }
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    let budget = PEER_TIMEOUT.min(deadline - now);
                    match answer(stream, token, world_size, payload, budget) {
                        Ok(rank) => {
                            served.insert(rank);
                        }
                        Err(why) => last_refusal = Some(format!("{peer}: {why}")),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(RETRY_PAUSE / 5),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => return Err(self.io(source)),
            }
        }
        Ok(())
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::RendezvousIo {
            addr: self.addr.clone(),
            source,
        }
    }
}

/// Entry points of both sides.
pub struct Rendezvous;

impl Rendezvous {
    /// Binds `bind` and serves `payload` to ranks 1..`world_size` (see [`RendezvousServer`]).
    pub fn serve(
        bind: &str,
        token: &str,
        world_size: usize,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<()> {
        RendezvousServer::bind(bind)?.serve(token, world_size, payload, timeout)
    }

    /// Fetches the payload served at `addr` (`host:port`) as `rank`, retrying the connection
    /// until `timeout` passes (rank 0 may start later than this rank).
    pub fn fetch(addr: &str, token: &str, rank: usize, timeout: Duration) -> Result<Vec<u8>> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut last_error = String::from("no attempt finished");
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::RendezvousTimeout {
                    addr: addr.to_string(),
                    waited: started.elapsed(),
                    detail: format!(
                        "{last_error}; is rank 0 running, and can this host reach {addr}?"
                    ),
                });
            }
            match request(addr, token, rank, PEER_TIMEOUT.min(deadline - now)) {
                Ok(Reply::Accepted(payload)) => return Ok(payload),
                Ok(Reply::Refused(why)) => {
                    return Err(Error::RendezvousRefused {
                        addr: addr.to_string(),
                        why: format!(
                            "{why} (a process of another job may be serving this port: \
                             stop it or pick another MASTER_PORT)"
                        ),
                    })
                }
                Ok(Reply::Garbled(why)) => {
                    return Err(Error::RendezvousRefused {
                        addr: addr.to_string(),
                        why: format!("the answer is not a fuselora rendezvous reply: {why}"),
                    })
                }
                Err(e) => last_error = format!("last error: {e}"),
            }
            std::thread::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now())));
        }
    }
}

/// What rank 0 said to a request.
enum Reply {
    Accepted(Vec<u8>),
    Refused(String),
    Garbled(String),
}

/// One attempt: connect, send the request, read the reply. I/O errors mean "try again".
fn request(addr: &str, token: &str, rank: usize, budget: Duration) -> std::io::Result<Reply> {
    let target = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "the name has no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, budget)?;
    stream.set_read_timeout(Some(budget))?;
    stream.set_write_timeout(Some(budget))?;
    let rank = u32::try_from(rank).map_err(|_| std::io::Error::other("rank exceeds u32"))?;
    let mut body = MAGIC.to_vec();
    body.extend_from_slice(&rank.to_be_bytes());
    body.extend_from_slice(token.as_bytes());
    write_frame(&mut stream, &body)?;
    let reply = match read_frame(&mut stream) {
        Ok(reply) => reply,
        Err(e) if e.kind() == ErrorKind::InvalidData => return Ok(Reply::Garbled(e.to_string())),
        Err(e) => return Err(e),
    };
    Ok(match reply.split_first() {
        Some((&ACCEPTED, payload)) => {
            write_frame(&mut stream, ACK)?;
            Reply::Accepted(payload.to_vec())
        }
        Some((&REFUSED, why)) => Reply::Refused(String::from_utf8_lossy(why).into_owned()),
        _ => Reply::Garbled("unknown status byte".to_string()),
    })
}

/// Rank 0's handling of one connection: the served rank, or why it was refused.
fn answer(
    mut stream: TcpStream,
    token: &str,
    world_size: usize,
    payload: &[u8],
    budget: Duration,
) -> std::result::Result<usize, String> {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(budget)))
        .and_then(|_| stream.set_write_timeout(Some(budget)));
    setup.map_err(|e| e.to_string())?;
    let body = read_frame(&mut stream).map_err(|e| e.to_string())?;
    let verdict = judge(&body, token, world_size);
    let reply = match &verdict {
        Ok(_) => [&[ACCEPTED][..], payload].concat(),
        Err(why) => [&[REFUSED][..], why.as_bytes()].concat(),
    };
    // A peer that sent garbage may already be gone; its refusal is best effort.
    let sent = write_frame(&mut stream, &reply);
    let rank = verdict?;
    sent.map_err(|e| e.to_string())?;
    match read_frame(&mut stream) {
        Ok(ack) if ack == ACK => Ok(rank),
        Ok(_) => Err(format!(
            "rank {rank} answered with something other than ACK"
        )),
        Err(e) => Err(format!("rank {rank} did not confirm: {e}")),
    }
}

/// Checks a request body: magic, a rank in 1..W, the job token.
fn judge(body: &[u8], token: &str, world_size: usize) -> std::result::Result<usize, String> {
    let rest = body
        .strip_prefix(&MAGIC[..])
        .ok_or("not a fuselora rendezvous request")?;
    if rest.len() < 4 {
        return Err("request too short".to_string());
    }
    let (rank, presented) = rest.split_at(4);
    let rank = u32::from_be_bytes([rank[0], rank[1], rank[2], rank[3]]) as usize;
    if presented != token.as_bytes() {
        return Err(format!("wrong job token from rank {rank}"));
    }
    if rank == 0 || rank >= world_size {
        return Err(format!(
            "rank {rank} is not one of ranks 1..{} of this job",
            world_size - 1
        ));
    }
    Ok(rank)
}

fn write_frame(stream: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| std::io::Error::other("frame too long"))?;
    stream.write_all(&len.to_be_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// Reads one frame; an announced length over [`MAX_FRAME`] is `InvalidData`, not an allocation.
fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const TOKEN: &str = "job-7f3a";

    fn nccl_like_id() -> Vec<u8> {
        (0..128u32).map(|i| (i * 37 % 251) as u8).collect()
    }

    fn server() -> (RendezvousServer, String) {
        let server = RendezvousServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap().to_string();
        (server, addr)
    }

    #[test]
    fn three_ranks_get_the_payload() {
        let (server, addr) = server();
        let id = nccl_like_id();
        let clients: Vec<_> = (1..3)
            .map(|rank| {
                let addr = addr.clone();
                thread::spawn(move || {
                    Rendezvous::fetch(&addr, TOKEN, rank, Duration::from_secs(10))
                })
            })
            .collect();
        server
            .serve(TOKEN, 3, &id, Duration::from_secs(10))
            .unwrap();
        for client in clients {
            assert_eq!(client.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn a_rank_that_starts_before_rank_0_retries_until_it_serves() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap().to_string();
        drop(probe);
        let client = {
            let addr = addr.clone();
            thread::spawn(move || Rendezvous::fetch(&addr, TOKEN, 1, Duration::from_secs(10)))
        };
        thread::sleep(Duration::from_millis(400));
        Rendezvous::serve(&addr, TOKEN, 2, b"late", Duration::from_secs(10)).unwrap();
        assert_eq!(client.join().unwrap().unwrap(), b"late");
    }

    #[test]
    fn wrong_token_is_refused_and_the_right_one_still_served() {
        let (server, addr) = server();
        let handle = thread::spawn(move || server.serve(TOKEN, 2, b"id", Duration::from_secs(10)));
        let err = Rendezvous::fetch(&addr, "stale-job", 1, Duration::from_secs(5)).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::RendezvousRefused { .. }), "{message}");
        assert!(
            message.contains("wrong job token") && message.contains(&addr),
            "{message}"
        );
        assert_eq!(
            Rendezvous::fetch(&addr, TOKEN, 1, Duration::from_secs(5)).unwrap(),
            b"id"
        );
        handle.join().unwrap().unwrap();
    }

    #[test]
    fn rank_outside_the_world_is_refused() {
        let (server, addr) = server();
        let handle = thread::spawn(move || server.serve(TOKEN, 2, b"id", Duration::from_secs(10)));
        let err = Rendezvous::fetch(&addr, TOKEN, 5, Duration::from_secs(5)).unwrap_err();
        assert!(
            err.to_string().contains("rank 5 is not one of ranks 1..1"),
            "{err}"
        );
        assert_eq!(
            Rendezvous::fetch(&addr, TOKEN, 1, Duration::from_secs(5)).unwrap(),
            b"id"
        );
        handle.join().unwrap().unwrap();
    }

    #[test]
    fn garbage_and_oversized_frames_do_not_stop_the_server() {
        let (server, addr) = server();
        let handle = thread::spawn(move || server.serve(TOKEN, 2, b"id", Duration::from_secs(20)));
        // Bytes that are not a frame header we accept: 0xFFFFFFFF announced bytes.
        let mut oversized = TcpStream::connect(&addr).unwrap();
        oversized.write_all(&[0xFF; 64]).unwrap();
        let mut reply = Vec::new();
        // The server hangs up without reading the rest, so the close may arrive as a reset.
        match oversized.read_to_end(&mut reply) {
            Ok(_) => assert!(
                reply.is_empty(),
                "an oversized frame gets no answer: {reply:?}"
            ),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
        }
        // A well-formed frame with a body that is not a request.
        let mut garbage = TcpStream::connect(&addr).unwrap();
        write_frame(&mut garbage, b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let refusal = read_frame(&mut garbage).unwrap();
        assert_eq!(refusal[0], REFUSED);
        assert!(String::from_utf8_lossy(&refusal[1..]).contains("not a fuselora"));
        // A peer that connects and says nothing only costs the server its peer timeout.
        let _silent = TcpStream::connect(&addr).unwrap();
        assert_eq!(
            Rendezvous::fetch(&addr, TOKEN, 1, Duration::from_secs(10)).unwrap(),
            b"id"
        );
        handle.join().unwrap().unwrap();
    }

    #[test]
    fn fetch_timeout_names_host_and_port() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap().to_string();
        drop(probe);
        let started = Instant::now();
        let err = Rendezvous::fetch(&addr, TOKEN, 1, Duration::from_millis(600)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        let message = err.to_string();
        assert!(matches!(err, Error::RendezvousTimeout { .. }));
        assert!(
            message.contains(&format!("rendezvous at {addr} timed out")),
            "{message}"
        );
    }

    #[test]
    fn serve_timeout_names_the_missing_ranks() {
        let (server, addr) = server();
        let fetcher = {
            let addr = addr.clone();
            thread::spawn(move || Rendezvous::fetch(&addr, TOKEN, 2, Duration::from_secs(5)))
        };
        let err = server
            .serve(TOKEN, 4, b"id", Duration::from_millis(800))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&addr) && err.contains("ranks [1, 3] never fetched"),
            "{err}"
        );
        assert_eq!(fetcher.join().unwrap().unwrap(), b"id");
    }

    #[test]
    fn a_server_that_is_not_a_rendezvous_is_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let impostor = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = read_frame(&mut stream);
            stream.write_all(&[0x7F, 0xFF, 0xFF, 0xFF]).unwrap();
        });
        let err = Rendezvous::fetch(&addr, TOKEN, 1, Duration::from_secs(5)).unwrap_err();
        assert!(
            err.to_string().contains("not a fuselora rendezvous reply"),
            "{err}"
        );
        impostor.join().unwrap();
    }
}
