//! A CPU collective over TCP: ranks form a ring (each connects to the next, accepts the
//! previous) and all-reduce with reduce-scatter then all-gather. Each rank sends
//! 2(N-1)/N of the buffer, the bandwidth-optimal amount. Within a step, sending runs on
//! its own thread while the receiver adds incoming segments as they arrive, so transfer
//! and arithmetic overlap. Every socket has a timeout: a dead or silent peer is an error
//! naming the peer, never a hang.
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::{CollectiveError, ReduceOp};

mod handshake;
pub(crate) use handshake::RingKey;

/// Bytes per send/receive segment: small enough to pipeline, large enough to amortise syscalls.
const SEGMENT_BYTES: usize = 1 << 20;

/// Element types the ring can reduce.
pub(crate) trait Element: bytemuck::Pod + Send + Sync + std::ops::AddAssign {
    /// Divides by the world size (for means).
    fn scale(&mut self, by: f64);
}

impl Element for f32 {
    fn scale(&mut self, by: f64) {
        *self = (f64::from(*self) * by) as f32;
    }
}

impl Element for f64 {
    fn scale(&mut self, by: f64) {
        *self *= by;
    }
}

/// One rank's two ring connections.
pub(crate) struct Ring {
    rank: usize,
    world_size: usize,
    /// To rank + 1.
    next: Option<TcpStream>,
    /// From rank - 1.
    prev: Option<TcpStream>,
    next_rank: usize,
    prev_rank: usize,
}

impl Ring {
    /// Connects the ring. `listener` is this rank's own (bound before registering, so the
    /// address given to peers is already accepting); `peers[r]` is rank r's address.
    /// Both connections are authenticated with `key` (the job's) over `generation`.
    /// `connect_timeout` bounds the whole set-up; `timeout` bounds every later transfer.
    pub(crate) fn connect(
        rank: usize,
        peers: &[SocketAddr],
        listener: TcpListener,
        generation: u64,
        key: &RingKey,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let world_size = peers.len();
        assert!(rank < world_size, "rank {rank} outside world of {world_size}");
        let next_rank = (rank + 1) % world_size;
        let prev_rank = (rank + world_size - 1) % world_size;
        if world_size == 1 {
            return Ok(Self { rank, world_size, next: None, prev: None, next_rank, prev_rank });
        }
        let deadline = Instant::now() + connect_timeout;
        // Connect out and accept in concurrently: with two ranks, each is the other's next and prev.
        let next = std::thread::scope(|s| {
            let out = s.spawn(|| {
                let mut next = connect_with_retry(peers[next_rank], next_rank, deadline)?;
                // The peer answers once its set-up reaches the accept loop: wait until the deadline.
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                next.set_read_timeout(Some(left)).and_then(|_| next.set_write_timeout(Some(left))).ok();
                // The handshake's small messages must not wait for delayed ACKs (Nagle).
                next.set_nodelay(true).ok();
                handshake::connect(&mut next, key, generation, rank, next_rank).map_err(|reason| {
                    CollectiveError::Handshake { peer: next_rank, addr: peers[next_rank].to_string(), reason }
                })?;
                Ok(next)
            });
            let prev = accept_from(&listener, key, generation, prev_rank, rank, deadline);
            let next = out.join().expect("connect thread panicked");
            prev.and_then(|prev| next.map(|next| (next, prev)))
        })?;
        let (next, prev) = next;
        for s in [&next, &prev] {
            s.set_read_timeout(Some(timeout)).and_then(|_| s.set_write_timeout(Some(timeout))).ok();
            s.set_nodelay(true).ok();
        }
        Ok(Self { rank, world_size, next: Some(next), prev: Some(prev), next_rank, prev_rank })
    }

    /// A ring of test ranks (generation 1, one key) whose set-up and transfers time out after `t`.
    #[cfg(test)]
    pub(crate) fn for_tests(rank: usize, peers: &[SocketAddr], listener: TcpListener, t: Duration) -> Self {
        Self::connect(rank, peers, listener, 1, &RingKey::from_token("test"), t, t).expect("test ring")
    }

    /// This rank.
    #[cfg(test)]
    pub(crate) fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the ring.
    pub(crate) fn world_size(&self) -> usize {
        self.world_size
    }

    /// All-reduces `data` in place across the ring.
    pub(crate) fn all_reduce<T: Element>(
        &mut self,
        data: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        let n = self.world_size;
        if n > 1 && !data.is_empty() {
            let bounds: Vec<(usize, usize)> = (0..n).map(|c| chunk_bounds(data.len(), n, c)).collect();
            // Reduce-scatter: after N-1 steps, rank r holds the full sum of chunk (r + 1) mod N.
            for step in 0..n - 1 {
                let send = bounds[(self.rank + n - step) % n];
                let recv = bounds[(self.rank + n - step - 1) % n];
                self.exchange(data, send, recv, true)?;
            }
            // All-gather: pass the finished chunks around.
            for step in 0..n - 1 {
                let send = bounds[(self.rank + 1 + n - step) % n];
                let recv = bounds[(self.rank + n - step) % n];
                self.exchange(data, send, recv, false)?;
            }
        }
        if op == ReduceOp::Mean && n > 1 {
            let by = 1.0 / n as f64;
            data.iter_mut().for_each(|x| x.scale(by));
        }
        Ok(())
    }

    /// Copies rank `root`'s `data` to every rank (passed along the ring).
    pub(crate) fn broadcast<T: Element>(
        &mut self,
        data: &mut [T],
        root: usize,
    ) -> Result<(), CollectiveError> {
        let n = self.world_size;
        if n == 1 || data.is_empty() {
            return Ok(());
        }
        // Rank `root` sends; every other rank receives from prev, then forwards unless its
        // next is the root.
        let distance = (self.rank + n - root) % n;
        if distance != 0 {
            let prev_rank = self.prev_rank;
            let prev = self.prev.as_mut().expect("ring connected");
            read_exact_into(prev, bytemuck::cast_slice_mut(data), prev_rank, "broadcast")?;
        }
        if distance != n - 1 {
            let next_rank = self.next_rank;
            let next = self.next.as_mut().expect("ring connected");
            next.write_all(bytemuck::cast_slice(data))
                .map_err(|e| CollectiveError::io("broadcast", next_rank, e))?;
        }
        Ok(())
    }

    /// Returns once every rank has called it.
    pub(crate) fn barrier(&mut self) -> Result<(), CollectiveError> {
        // One element per rank, so every rank both sends and receives in each step.
        let mut token = vec![0f32; self.world_size];
        self.all_reduce(&mut token, ReduceOp::Sum)
    }

    /// Sends `data[send]` to next while receiving into `data[recv]` from prev (adding if
    /// `accumulate`, else overwriting). The two ranges are disjoint chunks.
    fn exchange<T: Element>(
        &mut self,
        data: &mut [T],
        send: (usize, usize),
        recv: (usize, usize),
        accumulate: bool,
    ) -> Result<(), CollectiveError> {
        let (next_rank, prev_rank) = (self.next_rank, self.prev_rank);
        let next = self.next.as_mut().expect("ring connected");
        let prev = self.prev.as_mut().expect("ring connected");
        let (send_slice, recv_slice) = split_disjoint(data, send, recv);
        let op = if accumulate { "all_reduce (reduce-scatter)" } else { "all_reduce (all-gather)" };
        std::thread::scope(|s| {
            let sender = s.spawn(move || {
                let bytes: &[u8] = bytemuck::cast_slice(send_slice);
                for segment in bytes.chunks(SEGMENT_BYTES) {
                    next.write_all(segment).map_err(|e| CollectiveError::io(op, next_rank, e))?;
                }
                Ok(())
            });
            let received = receive(prev, recv_slice, accumulate, prev_rank, op);
            let sent = sender.join().expect("ring sender panicked");
            received.and(sent)
        })
    }
}

fn receive<T: Element>(
    prev: &mut TcpStream,
    out: &mut [T],
    accumulate: bool,
    peer: usize,
    op: &'static str,
) -> Result<(), CollectiveError> {
    if !accumulate {
        return read_exact_into(prev, bytemuck::cast_slice_mut(out), peer, op);
    }
    let per_segment = (SEGMENT_BYTES / std::mem::size_of::<T>()).max(1);
    let mut buf: Vec<T> = vec![T::zeroed(); per_segment.min(out.len())];
    for dst in out.chunks_mut(per_segment) {
        let incoming = &mut buf[..dst.len()];
        read_exact_into(prev, bytemuck::cast_slice_mut(incoming), peer, op)?;
        for (d, s) in dst.iter_mut().zip(incoming.iter()) {
            *d += *s;
        }
    }
    Ok(())
}

fn read_exact_into(
    stream: &mut TcpStream,
    buf: &mut [u8],
    peer: usize,
    op: &'static str,
) -> Result<(), CollectiveError> {
    stream.read_exact(buf).map_err(|e| CollectiveError::io(op, peer, e))
}

/// `[start, end)` of chunk `c` when `len` elements are split into `n` near-equal chunks.
fn chunk_bounds(len: usize, n: usize, c: usize) -> (usize, usize) {
    let base = len / n;
    let extra = len % n;
    let start = c * base + c.min(extra);
    let size = base + usize::from(c < extra);
    (start, start + size)
}

fn split_disjoint<T>(data: &mut [T], a: (usize, usize), b: (usize, usize)) -> (&mut [T], &mut [T]) {
    if a.0 < b.0 {
        let (left, right) = data.split_at_mut(b.0);
        (&mut left[a.0..a.1], &mut right[..b.1 - b.0])
    } else {
        let (left, right) = data.split_at_mut(a.0);
        (&mut right[..a.1 - a.0], &mut left[b.0..b.1])
    }
}

/// How long an accepted connection may take to send its hello and proof.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections whose handshake may be under way at once. A new connection beyond it closes the
/// oldest pending one: a real peer finishes its handshake within a round trip, so strangers
/// that pile up silent connections only push out each other.
const MAX_PENDING_HANDSHAKES: usize = 64;

fn connect_with_retry(
    addr: SocketAddr,
    peer: usize,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    let mut backoff = Duration::from_millis(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CollectiveError::SetupTimeout { peer, addr: addr.to_string() });
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(_) => std::thread::sleep(backoff.min(left)), // peer not listening yet: back off
        }
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Accepts connections until one proves to be `prev_rank` of this job and generation. Each
/// connection's handshake runs on its own thread, so a stranger that connects first, and says
/// nothing or the wrong thing, delays nobody; one that fails is closed and logged.
fn accept_from(
    listener: &TcpListener,
    key: &RingKey,
    generation: u64,
    prev_rank: usize,
    rank: usize,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    listener.set_nonblocking(true).map_err(|e| CollectiveError::io("accept", prev_rank, e))?;
    let (proven_tx, proven) = mpsc::channel();
    // Pending handshakes, oldest first: a handle to close each, and whether it has ended.
    let mut pending: VecDeque<(TcpStream, Arc<AtomicBool>)> = VecDeque::new();
    loop {
        if let Ok(stream) = proven.try_recv() {
            return Ok(stream);
        }
        match listener.accept() {
            Ok((stream, from)) => {
                pending.retain(|(_, ended)| !ended.load(Ordering::SeqCst));
                if pending.len() >= MAX_PENDING_HANDSHAKES {
                    let (oldest, _) = pending.pop_front().expect("pending is full");
                    tracing::warn!(%from, generation, "too many ring handshakes under way: closed the oldest");
                    oldest.shutdown(std::net::Shutdown::Both).ok();
                }
                let ended = Arc::new(AtomicBool::new(false));
                if let Ok(handle) = stream.try_clone() {
                    pending.push_back((handle, ended.clone()));
                }
                let (key, proven_tx) = (key.clone(), proven_tx.clone());
                let left = deadline.saturating_duration_since(Instant::now());
                let limit = left.min(HELLO_TIMEOUT).max(Duration::from_millis(1));
                let handshake = move || {
                    let mut stream = stream;
                    stream.set_nonblocking(false).ok();
                    stream.set_nodelay(true).ok();
                    stream
                        .set_read_timeout(Some(limit))
                        .and_then(|_| stream.set_write_timeout(Some(limit)))
                        .ok();
                    match handshake::accept(&mut stream, &key, generation, prev_rank, rank) {
                        // After set-up ended (a duplicate), the stream is dropped: closed.
                        Ok(()) => drop(proven_tx.send(stream)),
                        Err(reason) => tracing::warn!(
                            %from,
                            expected_rank = prev_rank,
                            generation,
                            %reason,
                            "refused a ring connection that failed the handshake"
                        ),
                    }
                    ended.store(true, Ordering::SeqCst);
                };
                std::thread::Builder::new()
                    .name("ring-handshake".into())
                    .stack_size(256 << 10)
                    .spawn(handshake)
                    .map_err(|e| CollectiveError::io("accept", prev_rank, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(CollectiveError::SetupTimeout { peer: prev_rank, addr: "(incoming)".into() });
                }
                // Non-blocking accept poll; a proven stream arrives on the channel meanwhile.
                if let Ok(stream) = proven.recv_timeout(Duration::from_millis(5)) {
                    return Ok(stream);
                }
            }
            Err(e) => return Err(CollectiveError::io("accept", prev_rank, e)),
        }
    }
}

#[cfg(test)]
mod tests;
