//! PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1).
//!
//! Each present task's gradient `g_i` of its (fixed-weighted) loss `w_i·L_i` with respect to all
//! shared parameters, taken as one flat vector, is reduced across ranks. Then for each task
//! `i`, over the other tasks `j` in a random order: if `g_i^PC · g_j < 0`,
//! `g_i^PC ← g_i^PC − (g_i^PC · g_j)/‖g_j‖² · g_j` (projection onto the normal plane of the
//! *original* `g_j`). The shared parameters receive `Σ_i g_i^PC`; each task-specific head
//! parameter receives the gradient of its own task (the sum of all task gradients, since other
//! tasks do not reach it), left for the trainer's usual all-reduce. The order is drawn from
//! (seed, step) with SplitMix64, the same on every rank.
use mtl_job::splitmix::SplitMix64;
use tch::Tensor;

use super::grads::{accumulate_grads, flatten, task_grads, unflatten};
use super::{Reducer, WeightReport};
use crate::optim::{load_entries, step_tensor};
use crate::task::{Task, TaskValues};
use crate::WorkerError;

const STEP: &str = "weighting.pcgrad.step";

#[derive(Debug)]
pub(super) struct PcGrad {
    seed: u64,
    steps: u64,
}

impl PcGrad {
    pub(super) fn new(seed: u64) -> Self {
        Self { seed, steps: 0 }
    }

    pub(super) fn backward(
        &mut self,
        present: &[(Task, &Tensor)],
        fixed: &[f64; 3],
        shared: &[Tensor],
        heads: &[Tensor],
        reducer: &mut dyn Reducer,
    ) -> Result<WeightReport, WorkerError> {
        let inputs: Vec<Tensor> = shared.iter().chain(heads).map(Tensor::shallow_clone).collect();
        let mut weights = TaskValues::default();
        let mut total_loss: Option<Tensor> = None;
        let mut task_shared = Vec::with_capacity(present.len());
        let mut head_grads: Option<Vec<Tensor>> = None;
        for (k, &(task, loss)) in present.iter().enumerate() {
            let w = fixed[task.index()];
            weights.set(task, w);
            let weighted = loss.f_mul_scalar(w)?;
            let value = weighted.f_detach()?;
            total_loss = Some(match total_loss {
                Some(t) => t.f_add(&value)?,
                None => value,
            });
            let mut grads = task_grads(&weighted, &inputs, k + 1 < present.len())?;
            let heads_part = grads.split_off(shared.len());
            task_shared.push(flatten(&grads)?);
            head_grads = Some(match head_grads {
                Some(sum) => {
                    sum.iter().zip(&heads_part).map(|(a, b)| a.f_add(b)).collect::<Result<_, _>>()?
                }
                None => heads_part,
            });
        }
        reducer.all_reduce_mean(&mut task_shared)?;
        let mut rng = SplitMix64::new(self.seed ^ self.steps.wrapping_mul(SplitMix64::GAMMA));
        let orders: Vec<Vec<usize>> =
            (0..task_shared.len()).map(|i| others_shuffled(&mut rng, task_shared.len(), i)).collect();
        let combined = tch::no_grad(|| project_conflicts(&task_shared, &orders))?;
        let mut grads = unflatten(&combined, shared)?;
        grads.extend(head_grads.unwrap_or_default());
        accumulate_grads(&inputs, &grads)?;
        self.steps += 1;
        Ok(WeightReport {
            weights: super::host_tensors(&weights),
            total_loss: total_loss.expect("present is not empty"),
            grad_norms: super::TaskTensors::default(),
        })
    }

    pub(super) fn state_dict(&self) -> Vec<(String, Tensor)> {
        vec![(STEP.into(), step_tensor(self.steps))]
    }

    pub(super) fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<(), WorkerError> {
        let mut step = step_tensor(0);
        load_entries("weighting", &mut [(STEP.into(), &mut step)], state)?;
        self.steps = step.int64_value(&[]) as u64;
        Ok(())
    }
}

/// `Σ_i g_i^PC` where `g_i^PC` is `grads[i]` projected, in the order `orders[i]` (the other
/// tasks), off every original `grads[j]` it conflicts with. On the device: whether two
/// gradients conflict is a `where`, not a host branch, so nothing is read; a projection that
/// does not apply subtracts `0 · g_j`, which leaves `g_i^PC` exactly as it is.
pub(super) fn project_conflicts(grads: &[Tensor], orders: &[Vec<usize>]) -> Result<Tensor, WorkerError> {
    let sq_norms = grads.iter().map(|g| g.f_dot(g)).collect::<Result<Vec<_>, _>>()?;
    let mut sum = grads[0].f_zeros_like()?;
    for (i, order) in orders.iter().enumerate() {
        let mut g = grads[i].shallow_clone();
        for &j in order {
            let dot = g.f_dot(&grads[j])?;
            // `dot / ‖g_j‖²` where they conflict (dot < 0, so ‖g_j‖ > 0), else 0.
            let coefficient = dot.f_div(&sq_norms[j])?.f_where_scalarother(&dot.f_lt(0.0)?, 0.0)?;
            g = g.f_sub(&grads[j].f_mul(&coefficient)?)?;
        }
        sum = sum.f_add(&g)?;
    }
    Ok(sum)
}

/// `0..n` without `skip`, Fisher–Yates shuffled.
fn others_shuffled(rng: &mut SplitMix64, n: usize, skip: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).filter(|&j| j != skip).collect();
    rng.shuffle(&mut v);
    v
}
