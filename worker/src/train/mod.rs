//! The training step and the loops around it.
//!
//! [`Trainer::step`] spells out one data-parallel step: zero grads → per-batch normalisers
//! summed across ranks → forward → masked task losses → task weighting + backward → bucketed
//! gradient all-reduce (mean) → clip → optimizer step → BatchNorm buffers broadcast from rank 0.
//! Each rank scales its losses by the world size and divides by the GLOBAL normaliser, so the mean
//! of the ranks' gradients is exactly the gradient one process computes on the union of their
//! batches.
//! Layout: `epochs` (the epoch loop both modes share), `eval` (metric statistics from a loader),
//! `standalone` (`worker train --standalone`), `distributed` (`worker run`, driven by the
//! coordinator), `regroup` (continuing in a new generation after a peer is lost), `checkpoint` (the run's state on disk: written, checked, resumed from),
//! `unreadable` (the limit on training images the loader cannot read).
pub(crate) mod checkpoint;
pub(crate) mod distributed;
pub(crate) mod epochs;
pub(crate) mod eval;
pub(crate) mod job;
pub(crate) mod losses;
mod regroup;
pub(crate) mod standalone;
mod unreadable;

use mtl_job::JobConfig;
use tch::{Device, Kind, Tensor};

use crate::collective::{Collective, ReduceOp};
use crate::data::Batch;
use crate::model::MultiTaskModel;
use crate::optim::{clip_grad_norm, Optimizer, Schedule};
use crate::task::{Task, TaskLosses, TaskValues};
use crate::weighting::{Params, Reducer, TaskWeighting};
use crate::WorkerError;
use losses::Counts;

/// Lets task weighting reduce per-task gradients through the job's collective.
struct CollectiveReducer<'a>(&'a mut dyn Collective);

impl Reducer for CollectiveReducer<'_> {
    fn all_reduce_mean(&mut self, tensors: &mut [Tensor]) -> Result<(), WorkerError> {
        Ok(self.0.all_reduce(tensors, ReduceOp::Mean)?)
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// 1-based optimizer step.
    pub step: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Per-task loss (normalised, averaged over ranks: the loss of the global batch).
    pub losses: TaskValues,
    /// Per-task weight the weighting strategy applied.
    pub weights: TaskValues,
    /// GradNorm only: each task's gradient norm at the layer it balances (averaged over ranks);
    /// empty for the other strategies.
    pub task_grad_norms: TaskValues,
    /// Global gradient norm before clipping (when clipping is on).
    pub grad_norm: Option<f64>,
    /// Samples this step trained on, over all ranks (images the loaders could not read are
    /// not counted).
    pub samples: u64,
    /// Whether any rank held a stop request when the step began: every rank learns it from the
    /// same all-reduce, so all of them stop after this step.
    pub stop_requested: bool,
}

impl StepReport {
    /// Named scalars for the coordinator and logs: `loss/<task>`, `weight/<task>`, `lr`, and
    /// `grad_norm` (clipping) and `grad_norm/<task>` (GradNorm) when present.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut out = vec![("lr".to_string(), self.lr)];
        for task in Task::ALL {
            if let Some(l) = self.losses.value(task) {
                out.push((format!("loss/{}", task.short()), l));
            }
            if let Some(w) = self.weights.value(task) {
                out.push((format!("weight/{}", task.short()), w));
            }
            if let Some(n) = self.task_grad_norms.value(task) {
                out.push((format!("grad_norm/{}", task.short()), n));
            }
        }
        if let Some(g) = self.grad_norm {
            out.push(("grad_norm".into(), g));
        }
        out
    }
}

/// Training images per second between log steps, counted over all ranks.
#[derive(Debug)]
pub(crate) struct Throughput {
    since: std::time::Instant,
    samples: u64,
}

impl Default for Throughput {
    fn default() -> Self {
        Self { since: std::time::Instant::now(), samples: 0 }
    }
}

impl Throughput {
    /// Counts a step's samples.
    pub(crate) fn add(&mut self, samples: u64) {
        self.samples += samples;
    }

    /// Images per second since the last call (or [`Throughput::restart`]), then restarts.
    pub(crate) fn rate(&mut self) -> f64 {
        let rate = self.samples as f64 / self.since.elapsed().as_secs_f64().max(1e-9);
        self.restart();
        rate
    }

    /// Starts counting afresh (after an evaluation, which is not training time).
    pub(crate) fn restart(&mut self) {
        *self = Self::default();
    }
}

/// A rank's training state as named tensors, what a checkpoint holds of a [`Trainer`].
/// The learning-rate schedule is a function of `step`, so `step` is its position too.
#[derive(Debug)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Every variable of the model (parameters and buffers), named as in its `VarStore`.
    pub model: Vec<(String, Tensor)>,
    /// [`Optimizer::state_dict`].
    pub optimizer: Vec<(String, Tensor)>,
    /// [`TaskWeighting::state_dict`].
    pub weighting: Vec<(String, Tensor)>,
}

/// Model, optimizer, weighting, schedule and collective of one rank.
pub(crate) struct Trainer {
    /// The network.
    pub model: MultiTaskModel,
    optimizer: Optimizer,
    weighting: TaskWeighting,
    schedule: Schedule,
    collective: Box<dyn Collective>,
    clip_grad_norm: f64,
    step: u64,
    device: Device,
    bf16: bool,
    /// A stop request this rank contributes to every step's first all-reduce.
    stop: Option<crate::stop::StopRequest>,
}

impl Trainer {
    /// Builds optimizer and weighting for `model` and makes every rank start from rank 0's
    /// parameters and buffers.
    pub(crate) fn new(
        cfg: &JobConfig,
        model: MultiTaskModel,
        collective: Box<dyn Collective>,
    ) -> Result<Self, WorkerError> {
        let device = model.var_store().device();
        // SyncBatchNorm layers reduce through the same collective as the step.
        let collective = crate::model::sync_batch_norm::share_collective(&model, collective);
        let weighting = TaskWeighting::new(&cfg.weighting, cfg.job.seed, device);
        let mut named = model.parameters();
        named.extend(weighting.parameters());
        let optimizer = Optimizer::from_config(&cfg.train, named)?;
        let mut trainer = Self {
            model,
            optimizer,
            weighting,
            schedule: Schedule::from_config(&cfg.train),
            collective,
            clip_grad_norm: cfg.train.clip_grad_norm,
            step: 0,
            device,
            bf16: cfg.train.precision == mtl_job::Precision::Bf16,
            stop: None,
        };
        trainer.broadcast_state()?;
        Ok(trainer)
    }

    /// Every step tells the other ranks whether `stop` was requested on this one (see
    /// [`StepReport::stop_requested`]).
    pub(crate) fn with_stop(mut self, stop: crate::stop::StopRequest) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Optimizer steps taken so far.
    pub(crate) fn steps_done(&self) -> u64 {
        self.step
    }

    /// Ranks training together.
    pub(crate) fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    /// Ends an epoch: task weighting that adapts per epoch (DWA) turns the losses the steps
    /// recorded into the next epoch's weights. Every rank calls it after the same step.
    pub(crate) fn end_epoch(&mut self) {
        self.weighting.end_epoch();
    }

    /// The state to checkpoint. Model variables are the live tensors (not copies): write them
    /// out before the next step.
    pub(crate) fn state_dict(&self) -> TrainerState {
        let mut model: Vec<(String, Tensor)> = self.model.var_store().variables().into_iter().collect();
        model.sort_by(|a, b| a.0.cmp(&b.0));
        TrainerState {
            step: self.step,
            model,
            optimizer: self.optimizer.state_dict(),
            weighting: self.weighting.state_dict(),
        }
    }

    /// Restores [`Self::state_dict`]: every entry must be present with its shape, and nothing
    /// else may be given (errors name the entry).
    pub(crate) fn load_state_dict(&mut self, state: &TrainerState) -> Result<(), WorkerError> {
        let vars = self.model.var_store().variables();
        let mut live: Vec<(String, Tensor)> = vars.into_iter().collect();
        let mut live: Vec<(String, &mut Tensor)> = live.iter_mut().map(|(n, t)| (n.clone(), t)).collect();
        crate::optim::load_entries("model", &mut live, &state.model)?;
        self.optimizer.load_state_dict(&state.optimizer)?;
        self.weighting.load_state_dict(&state.weighting)?;
        if self.optimizer.steps() != state.step {
            return Err(WorkerError::State {
                owner: "optimizer",
                key: "step".into(),
                message: format!(
                    "{} optimizer steps saved with training step {}",
                    self.optimizer.steps(),
                    state.step
                ),
            });
        }
        self.step = state.step;
        Ok(())
    }

    /// Overwrites every parameter and buffer with rank 0's.
    fn broadcast_state(&mut self) -> Result<(), WorkerError> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        // Sorted by name: every rank must pass the same tensors in the same order.
        let mut named: Vec<(String, Tensor)> = self.model.var_store().variables().into_iter().collect();
        named.extend(self.weighting.parameters());
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut vars: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
        tch::no_grad(|| self.collective.broadcast(&mut vars, 0))?;
        Ok(())
    }

    /// Overwrites the buffers training changes (BatchNorm's running statistics) with rank 0's,
    /// as PyTorch DDP's `broadcast_buffers` does, so every rank evaluates and checkpoints the
    /// same model. One bucketed call; none when the model has no such buffers.
    fn broadcast_buffers(&mut self) -> Result<(), WorkerError> {
        let mut buffers: Vec<Tensor> = self.model.running_buffers().into_iter().map(|(_, t)| t).collect();
        if !buffers.is_empty() {
            tch::no_grad(|| self.collective.broadcast(&mut buffers, 0))?;
        }
        Ok(())
    }

    /// One optimizer step on this rank's `batch` (the ranks' batches together form the global
    /// batch). The reported losses are averaged over ranks.
    pub(crate) fn step(&mut self, batch: &Batch) -> Result<StepReport, WorkerError> {
        let world = self.collective.world_size() as f64;
        let batch = batch.to_device(self.device)?;
        self.optimizer.zero_grad()?;
        for (_, p) in self.weighting.parameters() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.f_zero_()?;
            }
        }

        // Normalisers summed over ranks before any loss divides by them.
        let targets = losses::build_targets(&self.model, &batch)?;
        // A stop request rides in the same all-reduce: every rank learns the same sum.
        let local = losses::local_counts(&batch, &targets)?;
        let stop = self.stop.as_ref().is_some_and(|s| s.is_requested());
        let mut counts = local.to_array().to_vec();
        counts.push(if stop { 1.0 } else { 0.0 });
        let mut counts = [Tensor::from_slice(&counts).to_device(self.device)];
        self.collective.all_reduce(&mut counts, ReduceOp::Sum)?;
        let (global, stops) = counts_from(&counts[0])?;

        // A batch whose every image was unreadable still takes part in every collective, also
        // in those of SyncBatchNorm's forward and backward passes (run on zero images).
        let losses = if batch.ids.is_empty() {
            let zero = self.zero_losses();
            match crate::model::sync_batch_norm::empty_batch_pass(&self.model, &batch.images)? {
                Some(through_norms) => zero.map(|_, l| l + &through_norms),
                None => zero,
            }
        } else {
            // Forward and losses under bf16 autocast when asked; backward runs after the guard.
            let _autocast =
                if self.bf16 { Some(crate::precision::bf16_autocast(self.device)?) } else { None };
            let outputs = self.model.forward(&batch.images, true)?;
            losses::task_losses(&outputs, &batch, &targets, &global)?
        };
        let scaled = losses.map(|_, l| l * world);
        let shared: Vec<Tensor> = self.model.shared_parameters().into_iter().map(|(_, t)| t).collect();
        let heads: Vec<Tensor> =
            Task::ALL.into_iter().flat_map(|t| self.model.head_parameters(t)).map(|(_, t)| t).collect();
        let gradnorm_layer = self.model.gradnorm_layer();
        let params = Params { shared: &shared, heads: &heads, gradnorm_layer: Some(&gradnorm_layer) };
        let report =
            self.weighting.backward(&scaled, params, &mut CollectiveReducer(self.collective.as_mut()))?;

        // Every rank all-reduces every gradient, also of heads without labels this step.
        let mut params: Vec<Tensor> = if self.weighting.reduces_shared_grads() {
            heads
        } else {
            shared.into_iter().chain(heads).collect()
        };
        params.extend(self.weighting.parameters().into_iter().map(|(_, t)| t));
        let mut grads = ensure_grads(&params)?;
        // The per-task losses ride in the same all-reduce as the gradients (their mean over
        // ranks is the global loss: each rank holds N x its share).
        let local_losses = task_values(&scaled)?;
        let present: Vec<Task> = local_losses.iter().map(|(t, _)| t).collect();
        let raw: Vec<f32> = local_losses.iter().map(|(_, &v)| v as f32).collect();
        grads.push(Tensor::from_slice(&raw).to_device(self.device));
        self.collective.all_reduce(&mut grads, ReduceOp::Mean)?;
        let reduced: Vec<f32> =
            Vec::<f32>::try_from(&grads.pop().expect("loss tensor").to_device(Device::Cpu))?;
        let mut values = TaskValues::default();
        for (task, v) in present.into_iter().zip(reduced) {
            values.set(task, f64::from(v));
        }
        self.weighting.record_losses(&values);

        let grad_norm = if self.clip_grad_norm > 0.0 {
            let all: Vec<Tensor> = self.model.parameters().into_iter().map(|(_, t)| t).collect();
            Some(clip_grad_norm(&all, self.clip_grad_norm)?.f_double_value(&[])?)
        } else {
            None
        };
        let lr = self.schedule.lr(self.step);
        self.optimizer.step(lr)?;
        self.broadcast_buffers()?;
        self.step += 1;

        Ok(StepReport {
            step: self.step,
            lr,
            losses: values,
            weights: report.weights,
            task_grad_norms: report.grad_norms,
            grad_norm,
            samples: global.samples.round() as u64,
            stop_requested: stops > 0.0,
        })
    }

    /// Evaluation statistics of this rank's share of the validation set.
    pub(crate) fn evaluate(
        &self,
        loader: impl Iterator<Item = Result<Batch, WorkerError>>,
        info: &crate::data::DatasetInfo,
    ) -> Result<mtl_metrics::EvalStats, WorkerError> {
        eval::evaluate(&self.model, loader, info)
    }

    /// Zero losses connected to every parameter of each enabled task (its head and the shared
    /// trunk), for a step without samples.
    fn zero_losses(&self) -> TaskLosses {
        let shared: Vec<Tensor> = self.model.shared_parameters().into_iter().map(|(_, t)| t).collect();
        let zero_for = |task: Task| {
            self.model.has_task(task).then(|| {
                let head = self.model.head_parameters(task).into_iter().map(|(_, t)| t);
                zero_through(shared.iter().map(Tensor::shallow_clone).chain(head), self.device)
            })
        };
        TaskLosses {
            cls: zero_for(Task::Classification),
            det: zero_for(Task::Detection),
            seg: zero_for(Task::Segmentation),
        }
    }
}

/// Loss values of the present tasks.
fn task_values(losses: &TaskLosses) -> Result<TaskValues, WorkerError> {
    let mut out = TaskValues::default();
    for (task, loss) in losses.present() {
        out.set(task, loss.f_double_value(&[])?);
    }
    Ok(out)
}

/// The all-reduced normalisers and the number of ranks that asked to stop.
fn counts_from(t: &Tensor) -> Result<(Counts, f64), WorkerError> {
    let v: Vec<f64> = Vec::<f64>::try_from(&t.to_device(Device::Cpu))?;
    Ok((Counts::from_array([v[0], v[1], v[2], v[3], v[4]]), v[5]))
}

/// The gradients of `params`, creating zero gradients where backward left none, so every rank
/// passes the same list to the all-reduce.
fn ensure_grads(params: &[Tensor]) -> Result<Vec<Tensor>, WorkerError> {
    let missing: Vec<Tensor> =
        params.iter().filter(|p| !p.grad().defined()).map(Tensor::shallow_clone).collect();
    if !missing.is_empty() {
        let device = missing[0].device();
        zero_through(missing.into_iter(), device).f_backward()?;
    }
    Ok(params.iter().map(|p| p.grad()).collect())
}

/// `0 * Σ sum(p)`: a zero whose backward defines a zero gradient for every `p`, so a loss or
/// a missing gradient connects to the parameters without changing anything.
fn zero_through(params: impl Iterator<Item = Tensor>, device: Device) -> Tensor {
    params.map(|p| p.sum(Kind::Float) * 0.0).fold(Tensor::zeros([], (Kind::Float, device)), |a, b| a + b)
}

#[cfg(test)]
mod tests;
