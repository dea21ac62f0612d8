//! Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with
//! Attention", eq. 7): with `r_t = L_t(k−1) / L_t(k−2)` the ratio of a task's mean loss over the
//! two previous epochs (or windows), `w_t = K · exp(r_t/T) / Σ_i exp(r_i/T)` for the `K` tasks
//! that have both values and temperature `T`; weights are 1 until two epochs have ended.
use tch::Tensor;

use super::{values_from, values_tensor};
use crate::optim::load_entries;
use crate::task::{Task, TaskValues};
use crate::WorkerError;

const HISTORY: [&str; 2] = ["weighting.dwa.loss_prev", "weighting.dwa.loss_prev2"];

#[derive(Debug)]
pub(super) struct Dwa {
    temperature: f64,
    /// Mean losses of the last epoch and the one before, NaN where a task had none.
    prev: [f64; 3],
    prev2: [f64; 3],
    weights: [f64; 3],
}

impl Dwa {
    pub(super) fn new(temperature: f64) -> Self {
        Self { temperature, prev: [f64::NAN; 3], prev2: [f64::NAN; 3], weights: [1.0; 3] }
    }

    pub(super) fn weight(&self, task: Task) -> f64 {
        self.weights[task.index()]
    }

    pub(super) fn end_epoch(&mut self, mean_losses: &TaskValues) {
        self.prev2 = self.prev;
        self.prev = Task::ALL.map(|t| mean_losses.value(t).unwrap_or(f64::NAN));
        self.update_weights();
    }

    fn update_weights(&mut self) {
        self.weights = [1.0; 3];
        let ratios: Vec<(usize, f64)> = (0..3)
            .filter(|&i| self.prev[i].is_finite() && self.prev2[i].is_finite() && self.prev2[i] > 0.0)
            .map(|i| (i, self.prev[i] / self.prev2[i]))
            .collect();
        if ratios.is_empty() {
            return;
        }
        // Softmax with the maximum subtracted, for large ratios or small temperatures.
        let max = ratios.iter().map(|&(_, r)| r / self.temperature).fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = ratios.iter().map(|&(_, r)| (r / self.temperature - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        for (&(i, _), e) in ratios.iter().zip(exps) {
            self.weights[i] = ratios.len() as f64 * e / sum;
        }
    }

    pub(super) fn state_dict(&self) -> Vec<(String, Tensor)> {
        vec![(HISTORY[0].into(), values_tensor(&self.prev)), (HISTORY[1].into(), values_tensor(&self.prev2))]
    }

    pub(super) fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<(), WorkerError> {
        let (mut prev, mut prev2) = (values_tensor(&self.prev), values_tensor(&self.prev2));
        load_entries(
            "weighting",
            &mut [(HISTORY[0].into(), &mut prev), (HISTORY[1].into(), &mut prev2)],
            state,
        )?;
        self.prev = values_from(&prev)?;
        self.prev2 = values_from(&prev2)?;
        self.update_weights();
        Ok(())
    }
}
