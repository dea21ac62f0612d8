//! One collective used from several places: the training step and the SyncBatchNorm layers,
//! which reduce inside forward and inside autograd's backward (on CUDA, autograd's device
//! thread). Each call takes a lock for its own duration, so calls from different places
//! follow each other in the order they are made.
use std::sync::{Arc, Mutex, MutexGuard};

use tch::Tensor;

use super::{Collective, CollectiveError, ReduceOp};

/// A cloneable handle to one collective; every clone talks to the same peers.
#[derive(Clone)]
pub(crate) struct SharedCollective {
    inner: Arc<Mutex<Box<dyn Collective>>>,
    world_size: usize,
}

impl std::fmt::Debug for SharedCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCollective").field("world_size", &self.world_size).finish()
    }
}

impl SharedCollective {
    /// Shares `collective`.
    pub(crate) fn new(collective: Box<dyn Collective>) -> Self {
        let world_size = collective.world_size();
        Self { inner: Arc::new(Mutex::new(collective)), world_size }
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn Collective>> {
        // A panic while holding the lock leaves the collective as usable as any failed call does.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Collective for SharedCollective {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError> {
        self.lock().all_reduce(tensors, op)
    }

    fn broadcast(&mut self, tensors: &mut [Tensor], root: usize) -> Result<(), CollectiveError> {
        self.lock().broadcast(tensors, root)
    }

    /// Never: it is shared because SyncBatchNorm layers call it inside backward, and a second
    /// thread's calls would interleave with theirs in a different order on each rank.
    fn overlaps_backward(&self) -> bool {
        false
    }

    #[cfg(test)]
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.lock().barrier()
    }
}
