//! Collectives between data-parallel ranks: all-reduce (sum or mean) in place over a list of
//! tensors, broadcast, barrier. Two backends behind one trait: a CPU TCP ring ([`ring`]) that
//! CI tests, and NCCL for CUDA tensors. Tensors are packed into flat buckets of about
//! `bucket_bytes` so each collective call moves large contiguous buffers.
pub(crate) mod bench;
mod bucket;
mod local;
pub(crate) mod nccl;
pub(crate) mod ring;
mod ring_collective;
mod shared;
mod traced;

pub(crate) use local::LocalCollective;
pub(crate) use ring_collective::RingCollective;
pub(crate) use shared::SharedCollective;
pub(crate) use traced::Traced;

use std::time::Duration;

use tch::Tensor;

/// How values from all ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReduceOp {
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
    /// The peer this rank connected to failed the membership handshake.
    #[error("ring set-up: rank {peer} ({addr}) failed the handshake: {reason}")]
    Handshake {
        /// The peer's rank.
        peer: usize,
        /// Its address.
        addr: String,
        /// What went wrong.
        reason: String,
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

/// The operations data-parallel training needs. Implementations are used from one thread at a
/// time (the SyncBatchNorm layers may call one from autograd's thread between the step's calls).
pub(crate) trait Collective: Send {
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// All-reduces every tensor in place. All ranks pass tensors of the same shapes, in order.
    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError>;
    /// Overwrites every tensor with rank `root`'s values.
    fn broadcast(&mut self, tensors: &mut [Tensor], root: usize) -> Result<(), CollectiveError>;
    /// Whether the training step may all-reduce gradient buckets from a second thread while
    /// backward runs (docs/ARCHITECTURE.md): the CPU ring, whose calls only touch the tensors
    /// given. Not NCCL yet: its kernels would need ordering against autograd's stream.
    fn overlaps_backward(&self) -> bool {
        false
    }
    /// Returns once every rank has entered it.
    #[cfg(test)]
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}

/// Timeouts for collectives: set-up is slow (peers start at different times), steps are not.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// Bound on connecting the ring / creating the communicator.
    pub setup: Duration,
    /// Bound on any single transfer once running.
    pub step: Duration,
}
