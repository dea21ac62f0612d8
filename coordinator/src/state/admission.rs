//! Elastic growth up to `rendezvous.max_workers`. A worker that registers while a generation
//! runs with room to spare waits in the rendezvous; at the generation's next admission point
//! (the first train shard of an epoch, or a checkpoint commit) the generation ends for regroup,
//! and the next one forms from its members, holding their state, and the newcomers, who take
//! that state from the state root by broadcast (see `regroup`). Admitting only at those points
//! bounds the cost to one regroup per point, and puts it where the workers pause anyway; no
//! step is trained twice, since the survivors continue from memory.
use std::time::Instant;

use super::{JobState, Phase, Registered, WorkerInfo};
use crate::CoordinatorError;

impl JobState {
    /// A worker that is not a member registers while generation `id` of `world` workers runs: it waits for the next
    /// admission point when the generation and the workers already waiting leave room below
    /// `max_workers`, else it is refused. A worker holding state from an older generation
    /// (a survivor that came back too late) joins as a newcomer: the running generation's
    /// state is newer than what it holds.
    pub(super) fn request_admission(
        &mut self,
        id: u64,
        world: usize,
        info: WorkerInfo,
    ) -> Result<Registered, CoordinatorError> {
        let max = self.cfg.rendezvous.max_workers();
        if self.pending.contains_key(&info.worker_id) {
            // A retried registration: it keeps its place in the queue.
            self.pending.insert(info.worker_id.clone(), info);
            return Ok(Registered::AwaitingAdmission);
        }
        if world + self.pending.len() >= max as usize {
            return Err(CoordinatorError::Full {
                job: self.cfg.job.name.clone(),
                generation: id,
                world_size: world as u32,
                waiting: self.pending.len() as u32,
                max,
                worker_id: info.worker_id,
            });
        }
        let worker_id = info.worker_id.clone();
        tracing::info!(%worker_id, host = %info.host, device = %info.device, generation = id, "worker waits for admission");
        self.held.remove(&worker_id);
        self.pending.insert(worker_id.clone(), info);
        let detail = format!(
            "worker `{worker_id}` asked to join generation {id} ({world} worker(s), rendezvous.max_workers = \
             {max}); it is admitted at the generation's next epoch start or checkpoint commit, whichever \
             comes first"
        );
        self.log_event(id, "admission_requested", detail)?;
        Ok(Registered::AwaitingAdmission)
    }

    /// An admission point of the running generation, `when` saying where it is ("at the start
    /// of epoch 3 (step 40)"). With workers waiting to join, the generation ends for regroup
    /// so that the next one forms with them.
    pub(super) fn admit_waiting(&mut self, when: &str, now: Instant) -> Result<(), CoordinatorError> {
        if self.pending.is_empty() || !matches!(self.phase, Phase::Running) {
            return Ok(());
        }
        let ids: Vec<String> = self.pending.keys().map(|id| format!("`{id}`")).collect();
        let reason = format!("admitting worker(s) {} {when}", ids.join(", "));
        self.end_for_regroup(reason, now)
    }
}
