//! Task weighting: how the losses of the three tasks (classification, detection, segmentation;
//! any may be off or absent from a batch) become one backward pass.
//!
//! - `fixed`: `Σ w_t·L_t`.
//! - `uncertainty` (Kendall et al. 2018): `Σ exp(−s_t)·L_t + s_t` with a learnable log-variance
//!   `s_t` per task (initialised to 0, trained with the model through [`TaskWeighting::parameters`]).
//!   This is the common simplified form of the paper's `L/(2σ²) + log σ` with `s = log σ²`: the
//!   constant factors ½ are dropped for every task alike.
//! - `dwa` ([`dwa`], Liu et al. 2019), `gradnorm` ([`gradnorm`], Chen et al. 2018) and `pcgrad`
//!   ([`pcgrad`], Yu et al. 2020) are described in their modules.
//!
//! In data-parallel training every rank must apply the update one process would apply to the
//! whole batch. Strategies that are linear in the gradients (fixed, uncertainty, DWA) leave the
//! reduction to the trainer's all-reduce of `.grad()`. GradNorm and PCGrad are not linear: they
//! reduce the per-task gradients (and GradNorm the loss values) through a [`Reducer`] *before*
//! computing norms or projections, so all ranks compute the same weights and projections.
//! This relies on each rank's losses being scaled so that their mean over ranks is the
//! whole-batch loss (normalisers summed across ranks, divided by the world size).
mod dwa;
mod gradnorm;
mod grads;
mod pcgrad;
#[cfg(test)]
mod tests;

use mtl_job::{WeightingSection, WeightingStrategy};
use tch::{Device, Kind, Tensor};

use self::{dwa::Dwa, gradnorm::GradNorm, pcgrad::PcGrad};
use crate::optim::load_entries;
use crate::task::{Task, TaskLosses, TaskValues};
use crate::WorkerError;

/// Averages tensors across data-parallel ranks, in place; the identity in one process.
pub(crate) trait Reducer {
    /// Replaces each tensor by its mean over ranks. Every rank passes the same list of shapes.
    fn all_reduce_mean(&mut self, tensors: &mut [Tensor]) -> Result<(), WorkerError>;
}

#[cfg(test)]
/// The reducer of a single process: leaves tensors as they are.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LocalReducer;

#[cfg(test)]
impl Reducer for LocalReducer {
    fn all_reduce_mean(&mut self, _tensors: &mut [Tensor]) -> Result<(), WorkerError> {
        Ok(())
    }
}

/// The parameters a weighted backward pass accumulates gradients into.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Params<'a> {
    /// Parameters all tasks use (backbone and neck), in the same order on every rank; PCGrad
    /// projects their gradients.
    pub shared: &'a [Tensor],
    /// Task-specific parameters (the heads).
    pub heads: &'a [Tensor],
    /// The shared weight where GradNorm compares the tasks' gradient norms; every enabled
    /// task's loss must reach it ([`crate::model::MultiTaskModel::gradnorm_layer`]). Only
    /// GradNorm needs it.
    pub gradnorm_layer: Option<&'a Tensor>,
}

/// What one weighted backward pass used, as 0-dim tensors (on the device where they were
/// computed there, on the CPU where the host knew them): the step reads them on log steps only.
#[derive(Debug)]
pub(crate) struct WeightReport {
    /// The weight each present task's loss received (for uncertainty `exp(−s_t)`).
    pub weights: TaskTensors,
    /// The value of the combined loss (for PCGrad `Σ w_t·L_t`, whose gradient it replaces).
    #[cfg_attr(not(test), expect(dead_code, reason = "the step does not log it; the tests check it"))]
    pub total_loss: Tensor,
    /// GradNorm only: each present task's gradient norm `‖∇_W L_t‖` at the balanced layer
    /// (reduced across ranks); empty for the other strategies.
    pub grad_norms: TaskTensors,
}

/// One 0-dim tensor per present task.
pub(crate) type TaskTensors = crate::task::PerTask<Tensor>;

/// Host values as CPU tensors, for the strategies that compute them on the host.
pub(crate) fn host_tensors(values: &TaskValues) -> TaskTensors {
    values.clone().map(|_, v| Tensor::from(v))
}

#[cfg(test)]
impl WeightReport {
    /// The weights, read on the host.
    pub(crate) fn weight_values(&self) -> TaskValues {
        read_values(&self.weights)
    }

    /// The combined loss, read on the host.
    pub(crate) fn total_loss_value(&self) -> f64 {
        self.total_loss.double_value(&[])
    }
}

/// Reads one tensor per task on the host.
#[cfg(test)]
pub(crate) fn read_values(values: &TaskTensors) -> TaskValues {
    let mut out = TaskValues::default();
    for (task, v) in values.iter() {
        out.set(task, v.double_value(&[]));
    }
    out
}

#[derive(Debug)]
enum Strategy {
    Fixed,
    /// Log-variances `s_t`, a `[3]` tensor in [`Task::ALL`] order.
    Uncertainty(Tensor),
    Dwa(Dwa),
    GradNorm(GradNorm),
    PcGrad(PcGrad),
}

/// The configured weighting strategy with its state.
#[derive(Debug)]
pub(crate) struct TaskWeighting {
    strategy: Strategy,
    /// `weighting.weights` in [`Task::ALL`] order.
    fixed: [f64; 3],
}

const LOG_VAR: &str = "weighting.log_var";

impl TaskWeighting {
    /// The strategy `[weighting]` selects. `seed` (the job seed) drives PCGrad's task order;
    /// `device` holds learnable weights.
    pub(crate) fn new(cfg: &WeightingSection, seed: u64, device: Device) -> Self {
        let fixed = [cfg.weights.cls, cfg.weights.det, cfg.weights.seg];
        let strategy = match cfg.strategy {
            WeightingStrategy::Fixed => Strategy::Fixed,
            WeightingStrategy::Uncertainty => {
                Strategy::Uncertainty(Tensor::zeros([3], (Kind::Float, device)).set_requires_grad(true))
            }
            WeightingStrategy::Dwa => Strategy::Dwa(Dwa::new(cfg.dwa_temperature)),
            WeightingStrategy::Gradnorm => {
                Strategy::GradNorm(GradNorm::new(cfg.gradnorm_alpha, cfg.gradnorm_lr, device))
            }
            WeightingStrategy::Pcgrad => Strategy::PcGrad(PcGrad::new(seed)),
        };
        Self { strategy, fixed }
    }

    /// Runs backward for the weighted multi-task loss, accumulating gradients into `.grad()` of
    /// the `params` and of [`Self::parameters`]. GradNorm balances gradients at
    /// `params.gradnorm_layer`; PCGrad projects the gradients of all of `params.shared`. Both
    /// reduce their per-task inputs with `reducer` first; the other strategies never call it.
    pub(crate) fn backward(
        &mut self,
        losses: &TaskLosses,
        params: Params<'_>,
        reducer: &mut dyn Reducer,
    ) -> Result<WeightReport, WorkerError> {
        let present = losses.present();
        if present.is_empty() {
            return Err(WorkerError::Weighting {
                strategy: self.strategy_name(),
                message: "no task loss in this step".into(),
            });
        }
        match &mut self.strategy {
            Strategy::Fixed => weighted_backward(&present, |t| self.fixed[t.index()]),
            Strategy::Uncertainty(log_var) => {
                let mut total: Option<Tensor> = None;
                let mut weights = TaskTensors::default();
                for &(task, loss) in &present {
                    let s = log_var.f_get(task.index() as i64)?;
                    let precision = s.f_neg()?.f_exp()?;
                    let term = precision.f_mul(loss)?.f_add(&s)?;
                    weights.set(task, precision.f_detach()?);
                    total = Some(match total {
                        Some(t) => t.f_add(&term)?,
                        None => term,
                    });
                }
                let total = total.expect("present is not empty");
                total.f_backward()?;
                Ok(WeightReport {
                    weights,
                    total_loss: total.f_detach()?,
                    grad_norms: TaskTensors::default(),
                })
            }
            Strategy::Dwa(dwa) => weighted_backward(&present, |t| dwa.weight(t)),
            Strategy::GradNorm(gn) => {
                let layer = params.gradnorm_layer.ok_or_else(|| WorkerError::Weighting {
                    strategy: "gradnorm",
                    message: "no shared layer to compare the tasks' gradient norms at".into(),
                })?;
                gn.backward(&present, layer, reducer)
            }
            Strategy::PcGrad(pc) => pc.backward(&present, &self.fixed, params.shared, params.heads, reducer),
        }
    }

    /// Whether [`Self::backward`] leaves the gradients of `shared` already reduced across ranks
    /// (PCGrad): the trainer's all-reduce may skip them (averaging identical values again only
    /// costs time and rounding).
    pub(crate) fn reduces_shared_grads(&self) -> bool {
        matches!(self.strategy, Strategy::PcGrad(_))
    }

    /// Whether [`Self::backward`] is one plain backward pass that never calls its reducer
    /// (fixed, uncertainty, DWA): then the trainer may reduce gradients while it runs. GradNorm
    /// and PCGrad run a pass per task and reduce in between.
    pub(crate) fn single_backward(&self) -> bool {
        matches!(self.strategy, Strategy::Fixed | Strategy::Uncertainty(_) | Strategy::Dwa(_))
    }

    /// Adds one step's per-task losses (0-dim tensors, not read here) to DWA's running means
    /// of the epoch; the values must be the same on every rank (reduced, as the trainer reports
    /// them). Other strategies ignore them.
    pub(crate) fn record_losses(&mut self, losses: &TaskTensors) -> Result<(), WorkerError> {
        match &mut self.strategy {
            Strategy::Dwa(dwa) => dwa.record_losses(losses),
            _ => Ok(()),
        }
    }

    /// Ends the epoch (or window): DWA turns the means recorded since the last call into the
    /// weights of the next epoch. Every rank calls it at the same step. Other strategies
    /// ignore it.
    pub(crate) fn end_epoch(&mut self) -> Result<(), WorkerError> {
        match &mut self.strategy {
            Strategy::Dwa(dwa) => dwa.end_epoch(),
            _ => Ok(()),
        }
    }

    /// Learnable weights to optimise (and all-reduce) with the model: uncertainty's
    /// `weighting.log_var`; empty for the other strategies (GradNorm updates its own).
    pub(crate) fn parameters(&self) -> Vec<(String, Tensor)> {
        match &self.strategy {
            Strategy::Uncertainty(log_var) => vec![(LOG_VAR.into(), log_var.shallow_clone())],
            _ => Vec::new(),
        }
    }

    /// All state to checkpoint, learnable weights included.
    pub(crate) fn state_dict(&self) -> Result<Vec<(String, Tensor)>, WorkerError> {
        Ok(match &self.strategy {
            Strategy::Fixed => Vec::new(),
            Strategy::Uncertainty(log_var) => vec![(LOG_VAR.into(), log_var.detach().copy())],
            Strategy::Dwa(dwa) => dwa.state_dict()?,
            Strategy::GradNorm(gn) => gn.state_dict()?,
            Strategy::PcGrad(pc) => pc.state_dict(),
        })
    }

    /// Restores [`Self::state_dict`]; errors name the missing or mismatched entry.
    pub(crate) fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<(), WorkerError> {
        match &mut self.strategy {
            Strategy::Fixed => load_entries("weighting", &mut [], state),
            Strategy::Uncertainty(log_var) => {
                load_entries("weighting", &mut [(LOG_VAR.into(), log_var)], state)
            }
            Strategy::Dwa(dwa) => dwa.load_state_dict(state),
            Strategy::GradNorm(gn) => gn.load_state_dict(state),
            Strategy::PcGrad(pc) => pc.load_state_dict(state),
        }
    }

    pub(crate) fn strategy_name(&self) -> &'static str {
        match self.strategy {
            Strategy::Fixed => "fixed",
            Strategy::Uncertainty(_) => "uncertainty",
            Strategy::Dwa(_) => "dwa",
            Strategy::GradNorm(_) => "gradnorm",
            Strategy::PcGrad(_) => "pcgrad",
        }
    }
}

/// `backward` of `Σ w_t·L_t` with `w_t = weight(t)` (host constants: nothing is read).
pub(super) fn weighted_backward(
    present: &[(Task, &Tensor)],
    weight: impl Fn(Task) -> f64,
) -> Result<WeightReport, WorkerError> {
    let mut weights = TaskValues::default();
    let mut total: Option<Tensor> = None;
    for &(task, loss) in present {
        let w = weight(task);
        weights.set(task, w);
        let term = loss.f_mul_scalar(w)?;
        total = Some(match total {
            Some(t) => t.f_add(&term)?,
            None => term,
        });
    }
    let total = total.expect("present is not empty");
    if total.requires_grad() {
        total.f_backward()?;
    }
    Ok(WeightReport {
        weights: host_tensors(&weights),
        total_loss: total.f_detach()?,
        grad_norms: TaskTensors::default(),
    })
}

/// A per-task `[3]` f64 state vector (NaN where unset), as stored in a checkpoint.
fn values_tensor(values: &[f64; 3]) -> Tensor {
    Tensor::from_slice(values)
}

fn values_from(tensor: &Tensor) -> Result<[f64; 3], WorkerError> {
    let v = Vec::<f64>::try_from(tensor.to_kind(Kind::Double))?;
    Ok([v[0], v[1], v[2]])
}
