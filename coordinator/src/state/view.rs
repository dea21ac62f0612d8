//! The job's status as `GetStatus` returns it.
use std::time::Instant;

use mtl_proto::v1::{JobStatus, WorkerPhase, WorkerStatus};

use super::{JobState, Phase, STATUS_EVENTS};
use crate::checkpoints::Checkpoint;

impl JobState {
    pub(crate) fn status(&self, now: Instant) -> JobStatus {
        let shown = self.generation.as_ref().or(self.ended.as_ref().map(|(g, _)| g));
        let (epoch, epoch_position) =
            shown.and_then(|g| self.accounting.current(g.id)).map_or((0, 0), |s| (s.epoch, s.end));
        let mut workers: Vec<WorkerStatus> = self
            .pending
            .values()
            .map(|info| WorkerStatus {
                worker_id: info.worker_id.clone(),
                host: info.host.clone(),
                device: info.device.clone(),
                state: "waiting".into(),
                ..Default::default()
            })
            .collect();
        if let Some(g) = shown {
            workers.extend(g.members.iter().enumerate().map(|(rank, m)| WorkerStatus {
                worker_id: m.info.worker_id.clone(),
                rank: rank as u32,
                host: m.info.host.clone(),
                device: m.info.device.clone(),
                state: format!("{:?}", m.state).to_lowercase(),
                last_step: m.progress.step,
                phase: phase_name(m.progress.phase).into(),
                heartbeat_age_ms: now.saturating_duration_since(m.last_seen).as_millis() as u64,
                collective_seq: m.progress.collective_seq,
            }));
        }
        let skip = self.events.len().saturating_sub(STATUS_EVENTS);
        JobStatus {
            job_name: self.cfg.job.name.clone(),
            state: if self.stop_done() { "interrupted".into() } else { self.phase.name().into() },
            generation: shown.map_or(0, |g| g.id),
            world_size: shown.map_or(0, |g| g.members.len() as u32),
            workers,
            history: self.history.points().to_vec(),
            message: match &self.phase {
                Phase::Failed(reason) => reason.clone(),
                _ => String::new(),
            },
            epoch,
            epoch_position,
            events: self.events[skip..].to_vec(),
            epoch_segments: self.accounting.segments().iter().map(|s| s.to_proto()).collect(),
            checkpoints: self.checkpoints.iter().map(Checkpoint::to_proto).collect(),
            resume: shown.and_then(|g| g.resume.as_ref()).map(Checkpoint::resume),
            config_hash: self.config_hash.clone(),
        }
    }
}

/// The phase as `coordinator status` shows it.
fn phase_name(phase: WorkerPhase) -> &'static str {
    match phase {
        WorkerPhase::Unspecified => "",
        WorkerPhase::Loading => "loading",
        WorkerPhase::Step => "step",
        WorkerPhase::AllReduce => "all-reduce",
        WorkerPhase::Checkpoint => "checkpoint",
        WorkerPhase::Eval => "eval",
        WorkerPhase::Waiting => "waiting",
    }
}
