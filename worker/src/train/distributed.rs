//! `worker run`: training driven by the coordinator. The coordinator decides the shards; the
//! ranks reduce gradients among themselves (ring or NCCL) and report losses (rank 0, already
//! averaged over ranks) and evaluation statistics (every rank, merged by the coordinator).
//! Compute runs on a blocking thread; coordinator RPCs go through the runtime `handle`.
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use mtl_job::sharding::TrainShard;
use mtl_job::{Backend, JobConfig};
use mtl_proto::v1::{MetricsKind, Split as WireSplit, WorkerPhase};
use tokio::runtime::Handle;

use super::checkpoint::{self, Record};
use super::epochs::{self, Driver, Position};
use super::{regroup, Rates, StepReport, StepValues, Trainer};
use crate::collective::nccl::NcclCollective;
use crate::collective::ring::Ring;
use crate::collective::{Collective, LocalCollective, RingCollective, Timeouts, Traced};
use crate::data::OrderedSplit;
use crate::session::Session;
use crate::{RunOutcome, WorkerError};

/// Builds the collective the job asks for on `device`, its calls counted into the heartbeats.
pub(crate) fn connect_collective(
    session: &Session,
    device: tch::Device,
    listener: TcpListener,
) -> Result<Box<dyn Collective>, WorkerError> {
    let cfg = &session.config;
    let p = &session.placement;
    let timeouts = Timeouts {
        setup: Duration::from_millis(cfg.comm.setup_timeout_ms),
        step: Duration::from_millis(cfg.comm.timeout_ms),
    };
    let backend = match (cfg.comm.backend, device) {
        (Backend::Auto, tch::Device::Cuda(_)) => Backend::Nccl,
        (Backend::Auto, _) => Backend::Ring,
        (b, _) => b,
    };
    let bucket_bytes = cfg.comm.bucket_bytes as usize;
    let inner: Box<dyn Collective> = match backend {
        Backend::Nccl => {
            let tch::Device::Cuda(index) = device else {
                return Err(WorkerError::Device {
                    device: format!("{device:?}"),
                    message: "comm.backend = \"nccl\" needs a CUDA device".into(),
                });
            };
            Box::new(NcclCollective::new(
                p.rank as usize,
                p.world_size as usize,
                &p.nccl_unique_id,
                index,
                timeouts,
                bucket_bytes,
            )?)
        }
        _ => {
            let peers = p
                .peers
                .iter()
                .map(|peer| {
                    peer.peer_addr.parse::<SocketAddr>().map_err(|_| WorkerError::PeerAddress {
                        rank: peer.rank,
                        device: peer.device.clone(),
                        addr: peer.peer_addr.clone(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let ring = Ring::connect(
                p.rank as usize,
                &peers,
                listener,
                p.generation,
                &session.ring_key(),
                timeouts.setup,
                timeouts.step,
            )?;
            Box::new(RingCollective::new(ring, bucket_bytes))
        }
    };
    Ok(Box::new(Traced { inner, tracer: session.tracer() }))
}

/// Trains the job the session belongs to: from the committed checkpoint its generation
/// resumes from, from the state root's memory (a worker admitted into a running job), or
/// afresh (evaluating the untrained model first); evaluates every `train.eval_every_steps` and
/// at the end; rank 0 writes and commits a checkpoint every `checkpoint.every_steps` and at
/// the end, the final one also to `out`. A broken generation is left for the next one with
/// the trainer's state in memory (see `regroup`). A stop request (a signal, or the coordinator's
/// `DIRECTIVE_INTERRUPT`) ends training after a step all ranks agree on, with a committed
/// checkpoint of it (`crate::stop`).
pub(crate) fn train(
    session: &mut Session,
    handle: &Handle,
    device: tch::Device,
    listener: TcpListener,
    out: Option<PathBuf>,
) -> Result<RunOutcome, WorkerError> {
    let cfg = session.config.clone();
    let (train, val, model) = super::job::open_job(&cfg, device)?;
    let info = train.dataset.info.clone();
    // One rank alone until the generation's collective is connected.
    let mut trainer = Trainer::new(&cfg, model, Box::new(LocalCollective))?.with_stop(session.stop());
    if cfg.train.cuda_graphs {
        // The collective of a later generation may be NCCL, which orders itself after the
        // default stream that a captured step leaves (train/graph.rs).
        tracing::warn!(
            "train.cuda_graphs: only standalone training captures its step; `worker run` trains eagerly"
        );
    }
    let fresh = session.placement.state_root.is_none() && session.placement.resume.is_none();
    let mut start = regroup::start_generation(session, &mut trainer, &listener, &train, None)?;
    if fresh {
        // The untrained model's metrics, merged like every evaluation: the baseline for the rest.
        Coordinated::new(&cfg, session, handle, val.as_ref(), start).evaluate(&trainer, 0)?;
    }
    let outcome = loop {
        let mut driver = Coordinated::new(&cfg, session, handle, val.as_ref(), start);
        match epochs::train(&cfg, &mut trainer, &train, start, None, &mut driver) {
            Ok(outcome) => break outcome,
            Err(err) if regroup::recoverable(&err) => {
                let at = driver.position().unwrap_or(start);
                start = regroup::regroup(session, handle, &mut trainer, &listener, &train, at, &err)?;
            }
            Err(err) => return Err(err),
        }
    };
    tracing::info!(
        steps = trainer.steps_done(),
        epochs = outcome.epochs,
        train_seconds = format!("{:.1}", outcome.train_seconds),
        stopped = outcome.stopped,
        "training finished"
    );
    if outcome.stopped {
        return Ok(RunOutcome::Interrupted { step: trainer.steps_done() });
    }
    if let (0, Some(dir)) = (session.placement.rank, out) {
        let generation = session.placement.generation;
        let record = Record {
            cfg: &cfg,
            info: &info,
            train: &train,
            next: outcome.position,
            generation,
            metrics: None,
        };
        checkpoint::write_at(&dir, &trainer, &record)?;
        tracing::info!(dir = %dir.display(), "model saved");
    }
    Ok(RunOutcome::Finished)
}

/// Shards from the coordinator, losses reported to it by rank 0, evaluation statistics of
/// every rank's validation shard sent to it for merging, checkpoints written by rank 0 into
/// `checkpoint.dir` and committed to it.
struct Coordinated<'a> {
    cfg: &'a JobConfig,
    session: &'a mut Session,
    handle: &'a Handle,
    val: Option<&'a OrderedSplit>,
    /// Where this generation's state started in the data, which its first train shard request
    /// names so the coordinator shards the rest of that epoch (taken by that request).
    continues: Option<Position>,
    /// The current train shard: (epoch, its first position, its steps, steps done).
    at: Option<(u64, u64, u64, u64)>,
    /// `checkpoint.dir`.
    dir: PathBuf,
    /// The last step reported a stop request: the next checkpoint is the last of this run.
    stopping: bool,
}

impl<'a> Coordinated<'a> {
    fn new(
        cfg: &'a JobConfig,
        session: &'a mut Session,
        handle: &'a Handle,
        val: Option<&'a OrderedSplit>,
        start: Position,
    ) -> Self {
        let dir = cfg.checkpoint.dir_path(&cfg.job.name);
        Self { cfg, session, handle, val, continues: Some(start), at: None, dir, stopping: false }
    }

    /// Where this rank's state stands in the data (the next sample to train), once a shard began.
    fn position(&self) -> Option<Position> {
        let (epoch, start, steps, done) = self.at?;
        let global = u64::from(self.session.placement.world_size) * u64::from(self.cfg.train.batch_size);
        Some(if done == steps {
            Position { epoch: epoch + 1, consumed: 0 }
        } else {
            Position { epoch, consumed: start + done * global }
        })
    }
}

impl Driver for Coordinated<'_> {
    /// The coordinator keeps the epoch's position itself; `consumed` is sent only at the start
    /// of a generation (every rank holds the same).
    fn train_shard(
        &mut self,
        epoch: u64,
        _consumed: u64,
        train: &OrderedSplit,
    ) -> Result<TrainShard, WorkerError> {
        self.session.set_phase(WorkerPhase::Waiting);
        let position = self.continues.take().filter(|p| p.epoch == epoch).map(|p| p.consumed);
        let shard = self.handle.block_on(self.session.shard(
            WireSplit::Train,
            epoch,
            position,
            train.ids.len() as u64,
            train.fingerprint(),
        ))?;
        self.at = Some((epoch, shard.epoch_position, shard.steps, 0));
        Ok(TrainShard { positions: shard.positions, steps: shard.steps })
    }

    fn before_step(&mut self) -> Result<(), WorkerError> {
        self.session.set_phase(WorkerPhase::Step);
        self.session.check_stop()
    }

    fn after_step(
        &mut self,
        epoch: u64,
        report: &StepReport,
        values: Option<&StepValues>,
        rates: Option<Rates>,
    ) -> Result<(), WorkerError> {
        self.session.set_step(report.step);
        if let Some(values) = values {
            self.stopping = values.stop_requested;
        }
        if let Some((_, _, _, done)) = &mut self.at {
            *done += 1;
        }
        match values.zip(rates) {
            Some((values, rates)) if self.session.placement.rank == 0 => {
                let mut scalars: HashMap<String, f64> = values.scalars().into_iter().collect();
                scalars.extend(rates.scalars().map(|(k, v)| (k.to_string(), v)));
                self.handle.block_on(self.session.report(
                    MetricsKind::Train,
                    report.step,
                    epoch,
                    scalars,
                    Vec::new(),
                ))
            }
            _ => Ok(()),
        }
    }

    fn evaluate(&mut self, trainer: &Trainer, epoch: u64) -> Result<(), WorkerError> {
        let Some(val) = self.val else { return Ok(()) };
        self.session.set_phase(WorkerPhase::Eval);
        let shard = self.handle.block_on(self.session.shard(
            WireSplit::Val,
            0,
            None,
            val.ids.len() as u64,
            val.fingerprint(),
        ))?;
        let ids = val.ids_at(&shard.positions);
        let loader = val.eval_loader(&ids, self.cfg)?;
        let stats = trainer.evaluate(loader, &val.dataset.info)?;
        let json = serde_json::to_vec(&stats).expect("stats serialise");
        let step = trainer.steps_done();
        self.handle.block_on(self.session.report(MetricsKind::Eval, step, epoch, HashMap::new(), json))
    }

    /// Rank 0 writes `step-<N>/` and commits it; the other ranks hold the same state and write
    /// nothing.
    fn checkpoint(
        &mut self,
        trainer: &Trainer,
        train: &OrderedSplit,
        next: Position,
    ) -> Result<(), WorkerError> {
        if self.session.placement.rank != 0 {
            return Ok(());
        }
        self.session.set_phase(WorkerPhase::Checkpoint);
        let record = Record {
            cfg: self.cfg,
            info: &train.dataset.info,
            train,
            next,
            generation: self.session.placement.generation,
            metrics: None,
        };
        let written = checkpoint::write_step(&self.dir, trainer, &record)?;
        let name = written.path.strip_prefix(&self.dir).unwrap_or(&written.path).display().to_string();
        let step = trainer.steps_done();
        tracing::info!(path = %written.path.display(), step, "checkpoint written");
        self.handle.block_on(self.session.commit(name, step, next.epoch, next.consumed, self.stopping))
    }
}
