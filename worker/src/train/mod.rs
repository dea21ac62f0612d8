//! The training step and the loops around it.
//!
//! [`Trainer::step`] spells out one data-parallel step: zero grads → per-batch normalisers
//! summed across ranks → forward → masked task losses → task weighting + backward → bucketed
//! gradient all-reduce (mean; on the CPU ring during backward: `overlap`) → clip → optimizer
//! step → BatchNorm buffers broadcast from rank 0.
//! Each rank scales its losses by the world size and divides by the GLOBAL normaliser, so the mean
//! of the ranks' gradients is exactly the gradient one process computes on the union of their
//! batches.
//! Layout: `epochs` (the epoch loop both modes share), `eval` (metric statistics from a loader),
//! `standalone` (`worker train --standalone`), `distributed` (`worker run`, driven by the
//! coordinator), `regroup` (continuing in a new generation after a peer is lost), `checkpoint` (the run's state on disk: written, checked, resumed from),
//! `unreadable` (the limit on training images the loader cannot read), `flat_grads` (the one
//! gradient buffer), `overlap` (its all-reduce during backward) and `graph` (the step captured
//! in a CUDA graph, `train.cuda_graphs`).
pub(crate) mod bench_step;
pub(crate) mod checkpoint;
pub(crate) mod distributed;
pub(crate) mod epochs;
pub(crate) mod eval;
mod flat_grads;
mod graph;
pub(crate) mod job;
pub(crate) mod losses;
mod overlap;
mod regroup;
pub(crate) mod standalone;
mod unreadable;

use mtl_job::JobConfig;
use tch::{Device, Kind, Tensor};

use crate::collective::{Collective, ReduceOp};
use crate::data::Batch;
use crate::model::MultiTaskModel;
use crate::optim::{clip_flat_grad_norm, clip_grad_norm, Lr, Optimizer, Schedule};
use crate::task::{Task, TaskLosses, TaskValues};
use crate::weighting::{Params, Reducer, TaskTensors, TaskWeighting};
use crate::WorkerError;

/// Lets task weighting reduce per-task gradients through the job's collective.
struct CollectiveReducer<'a>(&'a mut dyn Collective);

impl Reducer for CollectiveReducer<'_> {
    fn all_reduce_mean(&mut self, tensors: &mut [Tensor]) -> Result<(), WorkerError> {
        Ok(self.0.all_reduce(tensors, ReduceOp::Mean)?)
    }
}

/// The reducer of an overlapped backward, where the collective belongs to the thread reducing
/// the gradients: only strategies that never reduce ([`TaskWeighting::single_backward`]) get it.
struct NoReducer(&'static str);

impl Reducer for NoReducer {
    fn all_reduce_mean(&mut self, _: &mut [Tensor]) -> Result<(), WorkerError> {
        Err(WorkerError::Weighting {
            strategy: self.0,
            message: "asked to all-reduce inside a backward pass overlapped with the gradient all-reduce"
                .into(),
        })
    }
}

/// What one step did. Its numbers stay where the step computed them (on the device) until
/// [`StepReport::read`]: reading makes the host wait for the device, so the epoch loop reads
/// on log steps (and where it must decide something) only.
#[derive(Debug)]
pub struct StepReport {
    /// 1-based optimizer step.
    pub step: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Per-task loss (normalised, averaged over ranks: the loss of the global batch).
    losses: TaskTensors,
    /// Per-task weight the weighting strategy applied.
    weights: TaskTensors,
    /// GradNorm only: each task's gradient norm at the layer it balances.
    task_grad_norms: TaskTensors,
    /// Global gradient norm before clipping (when clipping is on).
    grad_norm: Option<Tensor>,
    /// The step's counts summed over ranks ([`losses::local_counts`]): samples and stop flags.
    counts: Tensor,
}

/// A [`StepReport`] read on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct StepValues {
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
    /// Reads the step's numbers on the host: one copy from the device.
    pub fn read(&self) -> Result<StepValues, WorkerError> {
        let device = self.counts.device();
        // Every value as f64 on the counts' device, in one tensor: one copy to the host.
        let as_part = |t: &Tensor| t.f_to_device(device)?.f_to_kind(Kind::Double)?.f_reshape([-1]);
        let per_task = [&self.losses, &self.weights, &self.task_grad_norms];
        let mut parts = vec![as_part(&self.counts)?];
        for values in per_task {
            for (_, v) in values.iter() {
                parts.push(as_part(v)?);
            }
        }
        if let Some(g) = &self.grad_norm {
            parts.push(as_part(g)?);
        }
        let mut values = host_values(&Tensor::f_cat(&parts, 0)?)?.into_iter();
        let counts: Vec<f64> = values.by_ref().take(losses::COUNT_ENTRIES).collect();
        let (counts, stops) = losses::Counts::from_values(&counts)?;
        let mut read = |tensors: &TaskTensors| {
            let mut out = TaskValues::default();
            for (task, _) in tensors.iter() {
                out.set(task, values.next().expect("one value per present task"));
            }
            out
        };
        let (losses, weights, task_grad_norms) =
            (read(&self.losses), read(&self.weights), read(&self.task_grad_norms));
        Ok(StepValues {
            step: self.step,
            lr: self.lr,
            losses,
            weights,
            task_grad_norms,
            grad_norm: self.grad_norm.as_ref().map(|_| values.next().expect("the gradient norm")),
            samples: counts.samples.round() as u64,
            stop_requested: stops > 0.0,
        })
    }

    /// A report of step `step` at learning rate `lr` holding copies of this one's tensors: what
    /// a replay of a captured step reports, since the next replay overwrites the captured
    /// outputs.
    fn copied(&self, step: u64, lr: f64) -> Result<StepReport, WorkerError> {
        let copy = |t: &TaskTensors| -> Result<TaskTensors, tch::TchError> {
            let mut out = TaskTensors::default();
            for (task, v) in t.iter() {
                out.set(task, graph::copy_of(v)?);
            }
            Ok(out)
        };
        Ok(StepReport {
            step,
            lr,
            losses: copy(&self.losses)?,
            weights: copy(&self.weights)?,
            task_grad_norms: copy(&self.task_grad_norms)?,
            grad_norm: self.grad_norm.as_ref().map(graph::copy_of).transpose()?,
            counts: graph::copy_of(&self.counts)?,
        })
    }

    /// The samples the step trained on over all ranks, as a 0-dim f64 tensor on the device.
    pub(crate) fn samples(&self) -> Result<Tensor, WorkerError> {
        Ok(self.counts.f_get(4)?)
    }
}

impl StepValues {
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

/// The values of a small tensor on the host: the one way the training code reads device
/// values, each through `_local_scalar_dense`, so that the op counter sees every read also on
/// a CPU (where a plain copy to the host would be invisible).
pub(crate) fn host_values(t: &Tensor) -> Result<Vec<f64>, WorkerError> {
    let flat = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?.f_reshape([-1])?;
    (0..flat.size()[0]).map(|i| Ok(flat.f_double_value(&[i])?)).collect()
}

/// `t` on `device`, copied without making the host wait (a no-op when it is there already).
pub(crate) fn upload(t: &Tensor, device: Device) -> Result<Tensor, tch::TchError> {
    t.f_to_device_(device, t.kind(), true, false)
}

/// Training speed between log steps: images per second over all ranks, and where this rank's
/// time went per step: waiting for the loader, or in the step itself.
#[derive(Debug)]
pub(crate) struct Throughput {
    since: std::time::Instant,
    samples: u64,
    steps: u64,
    loader_wait: std::time::Duration,
}

impl Default for Throughput {
    fn default() -> Self {
        Self { since: std::time::Instant::now(), samples: 0, steps: 0, loader_wait: Default::default() }
    }
}

/// What [`Throughput::rates`] measured since the last log step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rates {
    /// Training images per second, over all ranks.
    pub images_per_s: f64,
    /// Milliseconds per step this rank waited for its loader.
    pub loader_wait_ms: f64,
    /// Milliseconds per step in the step itself (the rest of the time).
    pub step_ms: f64,
}

impl Rates {
    /// The rates as named scalars, for metrics (wall-clock values: `images_per_s` and `time/`).
    pub(crate) fn scalars(&self) -> [(&'static str, f64); 3] {
        [
            ("images_per_s", self.images_per_s),
            ("time/loader_wait_ms", self.loader_wait_ms),
            ("time/step_ms", self.step_ms),
        ]
    }
}

impl Throughput {
    /// Counts a step and the time it waited for its batch.
    pub(crate) fn add_step(&mut self, loader_wait: std::time::Duration) {
        self.steps += 1;
        self.loader_wait += loader_wait;
    }

    /// Counts samples trained (read from the steps' reports when they are read).
    pub(crate) fn add_samples(&mut self, samples: u64) {
        self.samples += samples;
    }

    /// The rates since the last call (or [`Throughput::restart`]), then restarts.
    pub(crate) fn rates(&mut self) -> Rates {
        let elapsed = self.since.elapsed().as_secs_f64().max(1e-9);
        let steps = self.steps.max(1) as f64;
        let wait = self.loader_wait.as_secs_f64();
        let rates = Rates {
            images_per_s: self.samples as f64 / elapsed,
            loader_wait_ms: 1000.0 * wait / steps,
            step_ms: 1000.0 * (elapsed - wait).max(0.0) / steps,
        };
        self.restart();
        rates
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
    /// The model's parameters, in the groups the step uses (built once: they never change).
    params: StepParams,
    /// The gradients as views of one buffer, when the parameters allow it.
    flat: Option<flat_grads::FlatGrads>,
    /// Reduces the buffer's buckets while backward runs, when the step and the collective
    /// allow it ([`Self::plan_overlap`]).
    overlap: Option<overlap::Overlap>,
    /// `comm.bucket_bytes` when the job and the model allow overlap with any collective.
    overlap_bucket_bytes: Option<usize>,
    clip_grad_norm: f64,
    step: u64,
    device: Device,
    bf16: bool,
    /// `train.batch_size`: the batches a captured step takes.
    batch_size: usize,
    /// The step captured in a CUDA graph (`train.cuda_graphs`).
    graph: Option<graph::StepGraph>,
    /// A stop request this rank contributes to every step's first all-reduce.
    stop: Option<crate::stop::StopRequest>,
}

impl Trainer {
    /// Builds optimizer and weighting for `model` and makes every rank start from rank 0's
    /// parameters and buffers.
    pub(crate) fn new(
        cfg: &JobConfig,
        mut model: MultiTaskModel,
        collective: Box<dyn Collective>,
    ) -> Result<Self, WorkerError> {
        crate::kernels::apply(&cfg.train, &mut model)?;
        let device = model.var_store().device();
        // SyncBatchNorm layers reduce through the same collective as the step.
        let collective = crate::model::sync_batch_norm::share_collective(&model, collective);
        let weighting = TaskWeighting::new(&cfg.weighting, cfg.job.seed, device);
        let mut named = model.parameters();
        named.extend(weighting.parameters());
        let optimizer = Optimizer::from_config(&cfg.train, named)?;
        let params = StepParams::new(&model, &weighting);
        let learnable: Vec<Tensor> = weighting.parameters().into_iter().map(|(_, t)| t).collect();
        // Only when the buffer covers every parameter the optimizer updates.
        let flat = if params.all.len() + learnable.len() == params.reduced.len() {
            flat_grads::FlatGrads::new(&params.shared, &params.heads, &learnable)?
        } else {
            None
        };
        // One plain backward pass, no SyncBatchNorm layers reducing inside it
        // (docs/ARCHITECTURE.md); the collective is checked in `plan_overlap`.
        let overlap_bucket_bytes = (flat.is_some()
            && cfg.comm.overlap
            && weighting.single_backward()
            && model.sync_context().is_none())
        .then_some(cfg.comm.bucket_bytes as usize);
        let mut trainer = Self {
            model,
            optimizer,
            weighting,
            schedule: Schedule::from_config(&cfg.train),
            collective,
            params,
            flat,
            overlap: None,
            overlap_bucket_bytes,
            clip_grad_norm: cfg.train.clip_grad_norm,
            step: 0,
            device,
            bf16: cfg.train.precision == mtl_job::Precision::Bf16,
            batch_size: cfg.train.batch_size as usize,
            graph: None,
            stop: None,
        };
        trainer.plan_overlap()?;
        trainer.broadcast_state()?;
        Ok(trainer)
    }

    /// Reduces gradients during backward from now on when the job, the model and the current
    /// collective allow it (see `overlap`), else after backward. Every condition is the same on
    /// every rank of a generation.
    fn plan_overlap(&mut self) -> Result<(), WorkerError> {
        self.overlap = None; // removes the hooks before new ones are set
        if let (Some(flat), Some(bucket_bytes)) = (&self.flat, self.overlap_bucket_bytes) {
            if self.collective.world_size() > 1 && self.collective.overlaps_backward() {
                self.overlap =
                    Some(overlap::Overlap::new(&self.params.reduced, flat.buffer(), bucket_bytes)?);
            }
        }
        Ok(())
    }

    /// Captures the step in a CUDA graph when `train.cuda_graphs` asks for it (`graph`). Only
    /// for a trainer that stays a world of one (standalone training, `worker bench-step`);
    /// errors name the key (not a CUDA device, the gradients not in one flat buffer).
    pub(crate) fn with_cuda_graphs(mut self, train: &mtl_job::TrainSection) -> Result<Self, WorkerError> {
        if !train.cuda_graphs {
            return Ok(self);
        }
        if self.flat.is_none() {
            return Err(graph::refuse(
                "needs every gradient in the one flat buffer, and this model's are not".into(),
            ));
        }
        self.graph = Some(graph::StepGraph::new(self.device)?);
        Ok(self)
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

    /// Counts a step that a replay of a captured graph took on the device.
    fn count_replayed_step(&mut self) {
        self.step += 1;
        self.optimizer.count_replayed_step();
    }

    /// Ranks training together.
    pub(crate) fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    /// Ends an epoch: task weighting that adapts per epoch (DWA) turns the losses the steps
    /// recorded into the next epoch's weights. Every rank calls it after the same step.
    pub(crate) fn end_epoch(&mut self) -> Result<(), WorkerError> {
        self.weighting.end_epoch()
    }

    /// The state to checkpoint. Model variables are the live tensors (not copies): write them
    /// out before the next step.
    pub(crate) fn state_dict(&self) -> Result<TrainerState, WorkerError> {
        let mut model: Vec<(String, Tensor)> = self.model.var_store().variables().into_iter().collect();
        model.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(TrainerState {
            step: self.step,
            model,
            optimizer: self.optimizer.state_dict(),
            weighting: self.weighting.state_dict()?,
        })
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
    /// batch). The reported losses are averaged over ranks. Nothing in the step reads a value
    /// from the device (see [`StepReport::read`]), whatever the weighting strategy.
    pub(crate) fn step(&mut self, batch: &Batch) -> Result<StepReport, WorkerError> {
        let batch = batch.to_device(self.device)?;
        let targets = losses::build_targets(&self.model, &batch)?;
        let stop = self.stop.as_ref().is_some_and(|s| s.is_requested());
        let host_known = losses::host_known_counts(&batch, &targets, stop)?;
        let inputs = StepInputs {
            batch: &batch,
            targets: &targets,
            host_known: &host_known,
            lr: self.schedule.lr(self.step),
        };
        match self.graph.take() {
            Some(mut graph) => {
                let report = graph.step(self, &inputs);
                self.graph = Some(graph);
                report
            }
            None => self.device_step(&inputs, Lr::Value(inputs.lr)),
        }
    }

    /// The step's work on the device, from inputs already there: what a CUDA graph captures
    /// (`graph`). `lr` is `inputs.lr`, as a value or as the device scalar a graph replays with.
    fn device_step(&mut self, inputs: &StepInputs<'_>, lr: Lr<'_>) -> Result<StepReport, WorkerError> {
        let world = self.collective.world_size() as f64;
        let StepInputs { batch, targets, host_known, lr: lr_value } = *inputs;
        // The optimizer holds the learnable task weights too: this zeroes theirs as well.
        match &mut self.flat {
            Some(flat) => flat.zero()?,
            None => self.optimizer.zero_grad()?,
        }

        // Normalisers summed over ranks before any loss divides by them; a stop request rides
        // in the same all-reduce, so every rank learns the same sum.
        let mut counts = [losses::device_counts(batch, host_known)?];
        self.collective.all_reduce(&mut counts, ReduceOp::Sum)?;
        let [counts] = counts;
        let normalisers = losses::Normalisers::new(&counts)?;

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
            losses::task_losses(&outputs, batch, targets, &normalisers)?
        };
        let scaled = losses.map(|_, l| l * world);
        let StepParams { shared, heads, gradnorm_layer, reduced, all } = &self.params;
        let params = Params { shared, heads, gradnorm_layer: Some(gradnorm_layer) };
        // With overlap, the gradients are reduced while backward runs.
        let (weighting, collective) = (&mut self.weighting, self.collective.as_mut());
        let report = match &mut self.overlap {
            Some(overlap) => {
                let name = weighting.strategy_name();
                overlap.backward(collective, || weighting.backward(&scaled, params, &mut NoReducer(name)))?
            }
            None => weighting.backward(&scaled, params, &mut CollectiveReducer(collective))?,
        };
        // Every rank all-reduces every gradient, also of heads without labels this step.
        let skip_shared = self.weighting.reduces_shared_grads();
        let mut grads = match (&self.flat, &self.overlap) {
            (_, Some(_)) => Vec::new(),
            (Some(flat), None) => vec![flat.to_reduce(skip_shared)?],
            (None, None) => ensure_grads(if skip_shared { &reduced[shared.len()..] } else { &reduced[..] })?,
        };
        // The per-task losses ride in the same all-reduce as the gradients, or follow the
        // overlapped ones (their mean over ranks is the global loss: each rank holds N x its share).
        let present: Vec<Task> = scaled.iter().map(|(t, _)| t).collect();
        let values: Vec<Tensor> =
            scaled.iter().map(|(_, l)| l.f_detach()?.f_to_kind(Kind::Float)).collect::<Result<_, _>>()?;
        grads.push(Tensor::f_stack(&values, 0)?);
        self.collective.all_reduce(&mut grads, ReduceOp::Mean)?;
        let reduced_losses = grads.pop().expect("the loss tensor").f_unbind(0)?;
        let mut losses = TaskTensors::default();
        for (task, loss) in present.into_iter().zip(reduced_losses) {
            losses.set(task, loss);
        }
        self.weighting.record_losses(&losses)?;

        let grad_norm = match (&self.flat, self.clip_grad_norm > 0.0) {
            (_, false) => None,
            (Some(flat), true) => Some(clip_flat_grad_norm(&flat.model()?, self.clip_grad_norm)?),
            (None, true) => Some(clip_grad_norm(all, self.clip_grad_norm)?),
        };
        self.optimizer.step(lr)?;
        self.broadcast_buffers()?;
        self.step += 1;

        Ok(StepReport {
            step: self.step,
            lr: lr_value,
            losses,
            weights: report.weights,
            task_grad_norms: report.grad_norms,
            grad_norm,
            counts,
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
        let zero_for = |task: Task| {
            self.model.has_task(task).then(|| {
                let head = self.model.head_parameters(task).into_iter().map(|(_, t)| t);
                zero_through(self.params.shared.iter().map(Tensor::shallow_clone).chain(head), self.device)
            })
        };
        TaskLosses {
            cls: zero_for(Task::Classification),
            det: zero_for(Task::Detection),
            seg: zero_for(Task::Segmentation),
        }
    }
}

/// What a step's device work takes ([`Trainer::device_step`]): the batch and its detection
/// targets on the device, the counts the host knows ([`losses::host_known_counts`]) uploaded,
/// and the step's learning rate.
#[derive(Clone, Copy)]
struct StepInputs<'a> {
    batch: &'a Batch,
    targets: &'a losses::Targets,
    host_known: &'a Tensor,
    lr: f64,
}

/// The model's parameters in the groups a step uses, listed once.
struct StepParams {
    /// Backbone and neck, in the same order on every rank.
    shared: Vec<Tensor>,
    /// The heads, task by task.
    heads: Vec<Tensor>,
    /// The weight where GradNorm compares the tasks' gradient norms.
    gradnorm_layer: Tensor,
    /// What the gradient all-reduce covers: `shared`, then `heads`, then `weighting`.
    reduced: Vec<Tensor>,
    /// Every model parameter (what clipping scales).
    all: Vec<Tensor>,
}

impl StepParams {
    fn new(model: &MultiTaskModel, weighting: &TaskWeighting) -> Self {
        let tensors = |named: Vec<(String, Tensor)>| named.into_iter().map(|(_, t)| t).collect::<Vec<_>>();
        let shared = tensors(model.shared_parameters());
        let heads: Vec<Tensor> =
            Task::ALL.into_iter().flat_map(|t| tensors(model.head_parameters(t))).collect();
        let weighting = tensors(weighting.parameters());
        let reduced = shared.iter().chain(&heads).chain(&weighting).map(Tensor::shallow_clone).collect();
        StepParams {
            shared,
            heads,
            gradnorm_layer: model.gradnorm_layer(),
            reduced,
            all: tensors(model.parameters()),
        }
    }
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
