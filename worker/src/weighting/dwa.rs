//! Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with
//! Attention", eq. 7): with `r_t = L_t(k−1) / L_t(k−2)` the ratio of a task's mean loss over the
//! two previous epochs (or windows), `w_t = K · exp(r_t/T) / Σ_i exp(r_i/T)` for the `K` tasks
//! that have both values and temperature `T`; weights are 1 until two epochs have ended.
//!
//! The epoch means are kept here: every step's reduced losses are added
//! ([`Dwa::record_losses`]) and [`Dwa::end_epoch`] divides by the number of steps in which
//! each task was present. The running sums are part of the state, so a checkpoint taken
//! mid-epoch resumes the same means.
use tch::{Kind, Tensor};

use super::{values_from, values_tensor, TaskTensors};
use crate::optim::load_entries;
use crate::task::Task;
use crate::WorkerError;

const HISTORY: [&str; 2] = ["weighting.dwa.loss_prev", "weighting.dwa.loss_prev2"];
const RUNNING: [&str; 2] = ["weighting.dwa.epoch_loss_sum", "weighting.dwa.epoch_steps"];

#[derive(Debug)]
pub(super) struct Dwa {
    temperature: f64,
    /// Mean losses of the last epoch and the one before, NaN where a task had none.
    prev: [f64; 3],
    prev2: [f64; 3],
    /// Sum of the losses recorded in the current epoch, and the number of steps each task
    /// was present in.
    epoch_sum: [f64; 3],
    epoch_steps: [f64; 3],
    /// Losses recorded since `epoch_sum` was last brought to the host: a `[3]` f64 tensor on
    /// the losses' device, summed there so that a step reads nothing.
    pending: Option<Tensor>,
    weights: [f64; 3],
}

impl Dwa {
    pub(super) fn new(temperature: f64) -> Self {
        Self {
            temperature,
            prev: [f64::NAN; 3],
            prev2: [f64::NAN; 3],
            epoch_sum: [0.0; 3],
            epoch_steps: [0.0; 3],
            pending: None,
            weights: [1.0; 3],
        }
    }

    pub(super) fn weight(&self, task: Task) -> f64 {
        self.weights[task.index()]
    }

    pub(super) fn record_losses(&mut self, losses: &TaskTensors) -> Result<(), WorkerError> {
        let Some((_, any)) = losses.iter().next() else { return Ok(()) };
        let zero = Tensor::f_zeros([], (Kind::Double, any.device()))?;
        let mut step = Vec::with_capacity(3);
        for task in Task::ALL {
            match losses.get(task) {
                Some(loss) => {
                    step.push(loss.f_to_kind(Kind::Double)?);
                    self.epoch_steps[task.index()] += 1.0;
                }
                None => step.push(zero.shallow_clone()),
            }
        }
        let step = Tensor::f_stack(&step, 0)?;
        self.pending = Some(match self.pending.take() {
            Some(sum) => sum.f_add(&step)?,
            None => step,
        });
        Ok(())
    }

    /// The epoch's loss sums, with what is pending on the device (a host read).
    fn sums(&self) -> Result<[f64; 3], WorkerError> {
        let Some(pending) = &self.pending else { return Ok(self.epoch_sum) };
        let pending = values_from(pending)?;
        Ok(std::array::from_fn(|i| self.epoch_sum[i] + pending[i]))
    }

    pub(super) fn end_epoch(&mut self) -> Result<(), WorkerError> {
        let sums = self.sums()?;
        self.prev2 = self.prev;
        self.prev =
            [0, 1, 2]
                .map(|i| if self.epoch_steps[i] > 0.0 { sums[i] / self.epoch_steps[i] } else { f64::NAN });
        self.epoch_sum = [0.0; 3];
        self.epoch_steps = [0.0; 3];
        self.pending = None;
        self.update_weights();
        Ok(())
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

    pub(super) fn state_dict(&self) -> Result<Vec<(String, Tensor)>, WorkerError> {
        Ok(vec![
            (HISTORY[0].into(), values_tensor(&self.prev)),
            (HISTORY[1].into(), values_tensor(&self.prev2)),
            (RUNNING[0].into(), values_tensor(&self.sums()?)),
            (RUNNING[1].into(), values_tensor(&self.epoch_steps)),
        ])
    }

    pub(super) fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<(), WorkerError> {
        let mut tensors =
            [self.prev, self.prev2, self.epoch_sum, self.epoch_steps].map(|v| values_tensor(&v));
        let [prev, prev2, sum, steps] = &mut tensors;
        load_entries(
            "weighting",
            &mut [
                (HISTORY[0].into(), prev),
                (HISTORY[1].into(), prev2),
                (RUNNING[0].into(), sum),
                (RUNNING[1].into(), steps),
            ],
            state,
        )?;
        [self.prev, self.prev2, self.epoch_sum, self.epoch_steps] =
            [values_from(prev)?, values_from(prev2)?, values_from(sum)?, values_from(steps)?];
        self.pending = None;
        self.update_weights();
        Ok(())
    }
}
