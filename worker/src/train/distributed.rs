//! `worker run`: training driven by the coordinator. The coordinator decides the shards; the
//! ranks reduce gradients among themselves (ring or NCCL) and report losses (rank 0, already
//! averaged over ranks) and evaluation statistics (every rank, merged by the coordinator).
//! Compute runs on a blocking thread; coordinator RPCs go through the runtime `handle`.
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use mtl_job::Backend;
use mtl_proto::v1::{MetricsKind, Split as WireSplit};
use tokio::runtime::Handle;

use super::{checkpoint, Trainer};
use crate::collective::nccl::NcclCollective;
use crate::collective::ring::Ring;
use crate::collective::{Collective, RingCollective, Timeouts};
use crate::data::{Loader, LoaderConfig};
use crate::session::Session;
use crate::WorkerError;

/// Builds the collective the job asks for on `device`.
pub fn connect_collective(
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
    match backend {
        Backend::Nccl => {
            let tch::Device::Cuda(index) = device else {
                return Err(WorkerError::Device {
                    device: format!("{device:?}"),
                    message: "comm.backend = \"nccl\" needs a CUDA device".into(),
                });
            };
            Ok(Box::new(NcclCollective::new(
                p.rank as usize,
                p.world_size as usize,
                &p.nccl_unique_id,
                index,
                timeouts,
                bucket_bytes,
            )?))
        }
        _ => {
            let peers = p
                .peers
                .iter()
                .map(|peer| {
                    peer.peer_addr.parse::<SocketAddr>().map_err(|_| WorkerError::Device {
                        device: peer.device.clone(),
                        message: format!(
                            "rank {} advertised peer address `{}`, not host:port",
                            peer.rank, peer.peer_addr
                        ),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let ring = Ring::connect(
                p.rank as usize,
                &peers,
                listener,
                p.generation,
                timeouts.setup,
                timeouts.step,
            )?;
            Ok(Box::new(RingCollective::new(ring, bucket_bytes)))
        }
    }
}

/// Trains the job the session belongs to; rank 0 saves the final model to `out`.
pub fn train(
    session: &mut Session,
    handle: &Handle,
    device: tch::Device,
    listener: TcpListener,
    out: Option<PathBuf>,
) -> Result<(), WorkerError> {
    let cfg = session.config.clone();
    let seed = cfg.job.seed;
    let rank = session.placement.rank;
    let (train, val, model) = super::standalone::open_job(&cfg, device)?;
    let info = train.dataset.info.clone();
    let collective = connect_collective(session, device, listener)?;
    let mut trainer = Trainer::new(&cfg, model, collective)?;
    let batch_size = cfg.train.batch_size as usize;

    let evaluate =
        |session: &mut Session, trainer: &Trainer, step: u64, epoch: u64| -> Result<(), WorkerError> {
            let Some(val) = &val else { return Ok(()) };
            let shard =
                handle.block_on(session.shard(WireSplit::Val, 0, val.ids.len() as u64, val.fingerprint()))?;
            let ids = val.ids_at(&shard.positions);
            let loader = Loader::new(
                val.dataset.clone(),
                &ids,
                LoaderConfig::from_section(&cfg.data, batch_size, false, seed, 0),
            )?;
            let stats = trainer.evaluate(loader, &info)?;
            let json = serde_json::to_vec(&stats).expect("stats serialise");
            handle.block_on(session.report(MetricsKind::Eval, step, epoch, HashMap::new(), json))
        };

    let mut epoch = 0;
    let mut meter = super::Throughput::default();
    while trainer.steps_done() < cfg.train.steps {
        let shard = handle.block_on(session.shard(
            WireSplit::Train,
            epoch,
            train.ids.len() as u64,
            train.fingerprint(),
        ))?;
        if shard.steps == 0 {
            return Err(WorkerError::Model {
                key: "train.batch_size".into(),
                message: format!(
                    "{} ranks x batch {} is more than the training split ({} samples)",
                    session.placement.world_size,
                    batch_size,
                    train.ids.len()
                ),
            });
        }
        let ids = train.ids_at(&shard.positions);
        let loader = Loader::new(
            train.dataset.clone(),
            &ids,
            LoaderConfig::from_section(&cfg.data, batch_size, true, seed, epoch),
        )?;
        for batch in loader.take(shard.steps as usize) {
            if trainer.steps_done() >= cfg.train.steps {
                break;
            }
            session.check_stop()?;
            let step = trainer.steps_done() + 1;
            let log = step % cfg.train.log_every_steps.max(1) == 0 || step == cfg.train.steps;
            let report = trainer.step(&batch?)?;
            meter.add(report.samples);
            session.set_step(step);
            if log && rank == 0 {
                let mut scalars: HashMap<String, f64> = report.scalars().into_iter().collect();
                scalars.insert("images_per_s".into(), meter.rate());
                handle.block_on(session.report(MetricsKind::Train, step, epoch, scalars, Vec::new()))?;
            }
            let every = cfg.train.eval_every_steps;
            if every > 0 && step % every == 0 && step < cfg.train.steps {
                evaluate(session, &trainer, step, epoch)?;
                meter.restart();
            }
        }
        epoch += 1;
    }
    evaluate(session, &trainer, trainer.steps_done(), epoch)?;
    if let (0, Some(dir)) = (rank, out) {
        checkpoint::save(&dir, &trainer.model, &cfg, &info)?;
        tracing::info!(dir = %dir.display(), "model saved");
    }
    Ok(())
}
