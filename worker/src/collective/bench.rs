//! `worker collective-bench`: one rank of a multi-process all-reduce benchmark over the CPU
//! ring. Measures, per message size, algorithm and bus bandwidth (bus bandwidth
//! = algbw * 2(N-1)/N, the convention of nccl-tests, comparable across world sizes).
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use super::ring::{Ring, RingKey};
use super::{CollectiveError, ReduceOp};

/// What one bench rank does.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// This rank.
    pub rank: usize,
    /// Every rank's address; this rank listens on `peers[rank]`.
    pub peers: Vec<SocketAddr>,
    /// Message sizes in bytes.
    pub sizes_bytes: Vec<usize>,
    /// Timed iterations per size (after one warm-up).
    pub iterations: usize,
    /// Transfer timeout.
    pub timeout: Duration,
}

/// One message size's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchResult {
    /// Ranks in the ring.
    pub world_size: usize,
    /// Message size.
    pub size_bytes: usize,
    /// Seconds per all-reduce.
    pub seconds: f64,
    /// Algorithm bandwidth, GB/s.
    pub algbw_gbs: f64,
    /// Bus bandwidth, GB/s.
    pub busbw_gbs: f64,
}

/// Runs the benchmark, handing each size's result to `on_result` as it is measured.
pub fn run(cfg: &BenchConfig, mut on_result: impl FnMut(&BenchResult)) -> Result<(), CollectiveError> {
    let listener =
        TcpListener::bind(cfg.peers[cfg.rank]).map_err(|e| CollectiveError::io("bind", cfg.rank, e))?;
    // Bench ranks are no job: they share a fixed key.
    let key = RingKey::from_token("collective-bench");
    let mut ring =
        Ring::connect(cfg.rank, &cfg.peers, listener, 0, &key, Duration::from_secs(60), cfg.timeout)?;
    let n = cfg.peers.len();
    for &size in &cfg.sizes_bytes {
        let mut data = vec![1f32; size / 4];
        ring.all_reduce(&mut data, ReduceOp::Sum)?; // warm-up
        ring.barrier()?;
        let start = Instant::now();
        for _ in 0..cfg.iterations {
            ring.all_reduce(&mut data, ReduceOp::Sum)?;
        }
        let seconds = start.elapsed().as_secs_f64() / cfg.iterations.max(1) as f64;
        let algbw = size as f64 / seconds / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        on_result(&BenchResult {
            world_size: n,
            size_bytes: size,
            seconds,
            algbw_gbs: algbw,
            busbw_gbs: busbw,
        });
    }
    Ok(())
}
