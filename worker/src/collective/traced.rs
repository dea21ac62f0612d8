//! A collective that tells the coordinator, through the worker's heartbeats, where this rank
//! is in the generation's collectives: the phase `all-reduce` while inside one, and how many it
//! has entered. When a collective fails, the coordinator compares the ranks' numbers to name
//! the rank that is behind rather than only the neighbour that noticed.
use tch::Tensor;

use super::{Collective, CollectiveError, ReduceOp};
use crate::session::Tracer;

/// `inner`, with every call recorded by `tracer`.
pub(crate) struct Traced {
    pub(crate) inner: Box<dyn Collective>,
    pub(crate) tracer: Tracer,
}

impl Traced {
    fn traced<T>(&mut self, call: impl FnOnce(&mut dyn Collective) -> T) -> T {
        let before = self.tracer.enter();
        let result = call(self.inner.as_mut());
        self.tracer.leave(before);
        result
    }
}

impl Collective for Traced {
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError> {
        self.traced(|c| c.all_reduce(tensors, op))
    }
    fn broadcast(&mut self, tensors: &mut [Tensor], root: usize) -> Result<(), CollectiveError> {
        self.traced(|c| c.broadcast(tensors, root))
    }
    fn overlaps_backward(&self) -> bool {
        self.inner.overlaps_backward()
    }
    #[cfg(test)]
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.traced(|c| c.barrier())
    }
}
