//! Recovery without a restart, the worker's half. When a collective fails (a peer died or timed
//! out) or the coordinator says the generation ended, the worker aborts its collective (dropping
//! the ring closes its sockets, so peers blocked on this rank fail at once instead of waiting
//! for the step timeout), keeps its process and its [`Trainer`], registers again with the state
//! it holds, connects the next generation's collective, and takes the whole training state and
//! the data position from the generation's state root by broadcast. Survivors are at most one
//! step apart, and the root is the one with the most steps, so every rank continues from a
//! state the old generation really reached (see docs/DECISIONS.md).
use std::net::TcpListener;

use tch::{Kind, Tensor};
use tokio::runtime::Handle;

use super::checkpoint;
use super::epochs::Position;
use super::{Trainer, TrainerState};
use crate::collective::{Collective, LocalCollective};
use crate::data::OrderedSplit;
use crate::session::{Held, Session};
use crate::WorkerError;

/// Whether `err` ends only the generation, not this worker: the survivors regroup after it.
pub(crate) fn recoverable(err: &WorkerError) -> bool {
    matches!(err, WorkerError::Collective(_) | WorkerError::GenerationEnded { .. })
}

/// Leaves the broken generation after `err` with the trainer's state at `at`, joins the next
/// one, and returns where training continues (the state root's position).
pub(crate) fn regroup(
    session: &mut Session,
    handle: &Handle,
    trainer: &mut Trainer,
    listener: &TcpListener,
    train: &OrderedSplit,
    at: Position,
    err: &WorkerError,
) -> Result<Position, WorkerError> {
    trainer.abort_collective();
    let held = Held {
        step: trainer.steps_done(),
        epoch: at.epoch,
        epoch_position: at.consumed,
        generation: session.placement.generation,
        reason: err.to_string(),
    };
    tracing::warn!(
        generation = held.generation,
        step = held.step,
        epoch = at.epoch,
        consumed = at.consumed,
        %err,
        "the generation broke; regrouping with the state held in memory"
    );
    handle.block_on(session.rejoin(&held))?;
    start_generation(session, trainer, listener, train, Some(at))
}

/// Connects the collective of the generation `session` is placed in and brings this rank to
/// the state the generation starts from: the state root's (a survivor's memory, by broadcast;
/// `held` is where this worker's own state stands, if it holds any), else the committed
/// checkpoint it resumes from (its newest complete predecessor when that one is corrupt), else
/// (a fresh job) rank 0's initial weights. Returns where training continues.
pub(crate) fn start_generation(
    session: &Session,
    trainer: &mut Trainer,
    listener: &TcpListener,
    train: &OrderedSplit,
    held: Option<Position>,
) -> Result<Position, WorkerError> {
    let listener =
        listener.try_clone().map_err(|source| WorkerError::Io { path: "peer listener".into(), source })?;
    let collective = super::distributed::connect_collective(session, trainer.device, listener)?;
    let p = &session.placement;
    let cfg = &session.config;
    let at = match (&p.state_root, &p.resume, held) {
        (Some(root), _, _) => {
            tracing::info!(
                generation = p.generation,
                rank = p.rank,
                world_size = p.world_size,
                root = root.rank,
                root_step = root.step,
                "taking the state from the generation's state root"
            );
            trainer.take_state_from(collective, root.rank as usize, held.unwrap_or_default())?
        }
        (None, _, Some(_)) => {
            return Err(WorkerError::Stopped {
                reason: format!(
                "generation {} was formed without a state root although this worker holds state at step {}",
                p.generation,
                trainer.steps_done()
            ),
            })
        }
        (None, Some(from), None) => {
            trainer.use_collective(collective)?;
            let dir = cfg.checkpoint.dir_path(&cfg.job.name);
            checkpoint::open_committed(&dir, &dir.join(&from.path), from.step)?
                .restore(trainer, cfg, train)?
        }
        (None, None, None) => {
            trainer.use_collective(collective)?;
            trainer.broadcast_state()?;
            Position::default()
        }
    };
    session.set_step(trainer.steps_done());
    Ok(at)
}

impl Trainer {
    /// Drops the collective (closing its connections); the trainer keeps its state.
    pub(crate) fn abort_collective(&mut self) {
        self.overlap = None;
        self.collective =
            crate::model::sync_batch_norm::share_collective(&self.model, Box::new(LocalCollective));
    }

    /// Trains with `collective` from now on (SyncBatchNorm layers too), reducing gradients
    /// during backward where it allows.
    pub(crate) fn use_collective(&mut self, collective: Box<dyn Collective>) -> Result<(), WorkerError> {
        self.collective = crate::model::sync_batch_norm::share_collective(&self.model, collective);
        self.plan_overlap()
    }

    /// Trains with `collective` from now on, every rank starting from rank `root`'s whole state:
    /// parameters and buffers (BatchNorm statistics), optimizer state, task-weighting state (DWA's
    /// sums, GradNorm's weights), the step (and so the schedule), and the data position `at`.
    /// Returns the root's position.
    pub(crate) fn take_state_from(
        &mut self,
        collective: Box<dyn Collective>,
        root: usize,
        at: Position,
    ) -> Result<Position, WorkerError> {
        self.use_collective(collective)?;
        if self.collective.world_size() == 1 {
            return Ok(at);
        }
        let state = self.state_dict()?;
        let position = [state.step as f64, at.epoch as f64, at.consumed as f64];
        let groups = [state.model, state.optimizer, state.weighting];
        // f32 travels as is, every other kind (step counters, f64 sums) as f64: exact for
        // integers below 2^53. Every rank passes the same names and shapes (state dicts are
        // allocated eagerly), in the same order.
        let mut travel = vec![Tensor::from_slice(&position).to_device(self.device)];
        for (_, t) in groups.iter().flatten() {
            let kind = if t.kind() == Kind::Float { Kind::Float } else { Kind::Double };
            travel.push(t.f_to_kind(kind)?.f_to_device(self.device)?.f_detach_copy()?);
        }
        tch::no_grad(|| self.collective.broadcast(&mut travel, root))?;
        let mut received = travel.into_iter();
        let position: Vec<f64> =
            Vec::<f64>::try_from(&received.next().expect("position").to_device(tch::Device::Cpu))?;
        let mut back = |group: &[(String, Tensor)]| -> Result<Vec<(String, Tensor)>, WorkerError> {
            group
                .iter()
                .map(|(name, t)| {
                    let r = received.next().expect("one tensor per entry");
                    Ok((name.clone(), r.f_to_kind(t.kind())?.f_to_device(t.device())?))
                })
                .collect()
        };
        let state = TrainerState {
            step: position[0] as u64,
            model: back(&groups[0])?,
            optimizer: back(&groups[1])?,
            weighting: back(&groups[2])?,
        };
        tch::no_grad(|| self.load_state_dict(&state))?;
        Ok(Position { epoch: position[1] as u64, consumed: position[2] as u64 })
    }
}
