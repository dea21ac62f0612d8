//! The collective of a single process.
use tch::Tensor;

use super::{Collective, CollectiveError, ReduceOp};

/// The collective of a single process: every operation is the identity.
#[derive(Debug, Default)]
pub struct LocalCollective;

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&mut self, _: &mut [Tensor], _: ReduceOp) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut [Tensor], _: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}
