//! Collectives between data-parallel ranks: all-reduce (sum or mean) in place over a list of
//! tensors, broadcast, barrier. Two backends behind one trait: a CPU TCP ring ([`ring`]) that
//! CI tests, and NCCL for CUDA tensors. Tensors are packed into flat buckets of about
//! `bucket_bytes` so each collective call moves large contiguous buffers.
pub mod bench;
pub mod nccl;
pub mod ring;

use std::time::Duration;

use tch::{Kind, Tensor};

/// How values from all ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean (sum divided by the world size).
    Mean,
}

/// Why a collective failed. Every variant names the peer or operation, so a log line says
/// which rank to look at.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A transfer with a peer failed: connection reset (peer died), or no data within the timeout.
    #[error("{op}: peer rank {peer} failed: {source}")]
    Peer {
        /// The operation in progress.
        op: &'static str,
        /// The peer's rank.
        peer: usize,
        /// The socket error (timeouts show as WouldBlock/TimedOut).
        source: std::io::Error,
    },
    /// A peer did not connect within the set-up timeout.
    #[error("ring set-up: rank {peer} ({addr}) did not connect in time")]
    SetupTimeout {
        /// The peer's rank.
        peer: usize,
        /// Its address, as known.
        addr: String,
    },
    /// A tensor cannot take part (wrong device or dtype for this backend).
    #[error("{op}: unsupported tensor: {message}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// NCCL returned an error or could not be loaded.
    #[error("nccl {op}: {message}")]
    Nccl {
        /// The NCCL call.
        op: &'static str,
        /// NCCL's error string or the loader's message.
        message: String,
    },
    /// A LibTorch operation on the buffers failed.
    #[error("collective buffer: {0}")]
    Torch(#[from] tch::TchError),
}

impl CollectiveError {
    pub(crate) fn io(op: &'static str, peer: usize, source: std::io::Error) -> Self {
        Self::Peer { op, peer, source }
    }
}

/// The operations data-parallel training needs. Implementations are used from one thread.
pub trait Collective: Send {
    /// This rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// All-reduces every tensor in place. All ranks pass tensors of the same shapes, in order.
    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError>;
    /// Overwrites every tensor with rank `root`'s values.
    fn broadcast(&mut self, tensors: &mut [Tensor], root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has entered it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}

/// Timeouts for collectives: set-up is slow (peers start at different times), steps are not.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Bound on connecting the ring / creating the communicator.
    pub setup: Duration,
    /// Bound on any single transfer once running.
    pub step: Duration,
}

/// Groups tensors (by index) into buckets of at most `bucket_bytes` each (a tensor larger
/// than that gets a bucket of its own), in order, all of one dtype.
pub fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        if i > start && (bytes + size > bucket_bytes || t.kind() != tensors[start].kind()) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

/// The CPU ring backend for tensors: packs each bucket into one flat f32/f64 buffer.
pub struct RingCollective {
    ring: ring::Ring,
    bucket_bytes: usize,
}

impl RingCollective {
    /// Wraps a connected ring.
    pub fn new(ring: ring::Ring, bucket_bytes: usize) -> Self {
        Self { ring, bucket_bytes: bucket_bytes.max(1) }
    }

    fn each_bucket(
        &mut self,
        tensors: &mut [Tensor],
        op: &'static str,
        mut f: impl FnMut(&mut ring::Ring, Flat<'_>) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        // Checked in a world of one too, so a misconfigured job fails the same way at any size.
        for t in tensors.iter() {
            if t.device() != tch::Device::Cpu || !matches!(t.kind(), Kind::Float | Kind::Double) {
                return Err(CollectiveError::Unsupported {
                    op,
                    message: format!(
                        "the ring backend takes CPU f32/f64 tensors, got {:?} {:?}",
                        t.device(),
                        t.kind()
                    ),
                });
            }
        }
        if self.ring.world_size() == 1 {
            return Ok(());
        }
        for range in buckets(tensors, self.bucket_bytes) {
            let group = &mut tensors[range];
            let flat =
                Tensor::f_cat(&group.iter().map(|t| t.f_reshape([-1])).collect::<Result<Vec<_>, _>>()?, 0)?;
            let numel = flat.numel();
            match flat.kind() {
                Kind::Double => {
                    let mut buf = vec![0f64; numel];
                    flat.f_copy_data(&mut buf, numel)?;
                    f(&mut self.ring, Flat::F64(&mut buf))?;
                    scatter_back(group, &Tensor::from_slice(&buf))?;
                }
                _ => {
                    let mut buf = vec![0f32; numel];
                    flat.f_copy_data(&mut buf, numel)?;
                    f(&mut self.ring, Flat::F32(&mut buf))?;
                    scatter_back(group, &Tensor::from_slice(&buf))?;
                }
            }
        }
        Ok(())
    }
}

enum Flat<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

/// Copies consecutive pieces of `flat` back into the tensors it was packed from.
fn scatter_back(group: &mut [Tensor], flat: &Tensor) -> Result<(), CollectiveError> {
    let _guard = tch::no_grad_guard();
    let mut offset = 0;
    for t in group.iter_mut() {
        let n = t.numel() as i64;
        let piece = flat.f_narrow(0, offset, n)?.f_view(t.size().as_slice())?;
        t.f_copy_(&piece)?;
        offset += n;
    }
    Ok(())
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.ring.rank()
    }

    fn world_size(&self) -> usize {
        self.ring.world_size()
    }

    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError> {
        self.each_bucket(tensors, "all_reduce", |ring, flat| match flat {
            Flat::F32(b) => ring.all_reduce(b, op),
            Flat::F64(b) => ring.all_reduce(b, op),
        })
    }

    fn broadcast(&mut self, tensors: &mut [Tensor], root: usize) -> Result<(), CollectiveError> {
        self.each_bucket(tensors, "broadcast", |ring, flat| match flat {
            Flat::F32(b) => ring.broadcast(b, root),
            Flat::F64(b) => ring.broadcast(b, root),
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.ring.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener};

    #[test]
    fn buckets_respect_size_and_dtype() {
        let t = |n: i64, kind| Tensor::zeros([n], (kind, tch::Device::Cpu));
        let ts = [
            t(10, Kind::Float),
            t(10, Kind::Float),
            t(100, Kind::Float),
            t(5, Kind::Double),
            t(1, Kind::Float),
        ];
        assert_eq!(buckets(&ts, 80), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(buckets(&ts, 1 << 20), vec![0..3, 3..4, 4..5]);
        assert!(buckets(&[], 10).is_empty());
    }

    #[test]
    fn ring_collective_reduces_tensors_of_mixed_shapes_and_dtypes() {
        let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let results: Vec<Vec<Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = &addrs;
                    s.spawn(move || {
                        let t = Duration::from_secs(20);
                        let ring = ring::Ring::connect(rank, addrs, l, 1, t, t).unwrap();
                        let mut c = RingCollective::new(ring, 64);
                        let r = rank as f64;
                        let mut ts = vec![
                            Tensor::full([2, 3], r, (Kind::Float, tch::Device::Cpu)),
                            Tensor::full([0], r, (Kind::Float, tch::Device::Cpu)),
                            Tensor::full([7], r + 0.5, (Kind::Double, tch::Device::Cpu)),
                            Tensor::arange(40, (Kind::Float, tch::Device::Cpu)) * (r + 1.0),
                        ];
                        c.all_reduce(&mut ts, ReduceOp::Mean).unwrap();
                        let mut b = vec![Tensor::full([3], r, (Kind::Float, tch::Device::Cpu))];
                        c.broadcast(&mut b, 2).unwrap();
                        ts.extend(b);
                        ts
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ts in &results {
            assert_eq!(ts[0], Tensor::full([2, 3], 1.0, (Kind::Float, tch::Device::Cpu)));
            assert_eq!(ts[1].numel(), 0);
            assert_eq!(ts[2], Tensor::full([7], 1.5, (Kind::Double, tch::Device::Cpu)));
            assert_eq!(ts[3], Tensor::arange(40, (Kind::Float, tch::Device::Cpu)) * 2.0);
            assert_eq!(ts[4], Tensor::full([3], 2.0, (Kind::Float, tch::Device::Cpu)));
        }
    }

    #[test]
    fn unsupported_tensors_are_refused_even_in_a_world_of_one() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_secs(1);
        let mut c = RingCollective::new(ring::Ring::connect(0, &[addr], l, 1, t, t).unwrap(), 64);
        let mut ts = vec![Tensor::zeros([2], (Kind::Int64, tch::Device::Cpu))];
        let err = c.all_reduce(&mut ts, ReduceOp::Sum).unwrap_err();
        assert!(err.to_string().contains("f32/f64"), "{err}");
    }
}
