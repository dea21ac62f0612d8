//! The collective of a single process.
use tch::Tensor;

use super::{Collective, CollectiveError, ReduceOp};

/// The collective of a single process: every operation is the identity.
#[derive(Debug, Default)]
pub(crate) struct LocalCollective;

impl Collective for LocalCollective {
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&mut self, _: &mut [Tensor], _: ReduceOp) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut [Tensor], _: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    #[cfg(test)]
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}
