//! Picking a job up where the state database left it.
use std::time::{Duration, Instant};

use super::{Generation, JobState, Member, MemberState, Phase, Progress};
use crate::store::{StoredGeneration, StoredOutcome};
use crate::CoordinatorError;

impl JobState {
    /// Picks the job up where the store left it.
    pub(super) fn restore(
        &mut self,
        outcome: Option<StoredOutcome>,
        generations: Vec<StoredGeneration>,
        now: Instant,
    ) -> Result<(), CoordinatorError> {
        let path = self.store.path().display().to_string();
        if outcome == Some(StoredOutcome::Finished) {
            tracing::info!(state_db = %path, "the job already finished");
            self.phase = Phase::Finished;
            return Ok(());
        }
        let running = generations.into_iter().last().filter(|g| g.end_cause.is_none());
        let detail = match running {
            Some(g) => {
                let grace = Duration::from_millis(self.cfg.rendezvous.coordinator_grace_ms);
                let resume =
                    g.resume_step.and_then(|step| self.checkpoints.iter().find(|c| c.step == step).cloned());
                let members = g
                    .members
                    .into_iter()
                    .map(|info| Member {
                        info,
                        state: MemberState::Detached,
                        last_seen: now,
                        progress: Progress::default(),
                    })
                    .collect::<Vec<_>>();
                let detail = format!(
                    "coordinator restarted from {path}: the {} workers of generation {} have {} ms to re-attach",
                    members.len(),
                    g.id,
                    grace.as_millis()
                );
                self.generation = Some(Generation { id: g.id, members, resume, root: None });
                self.reattach_deadline = Some(now + grace);
                self.phase = Phase::Running;
                detail
            }
            None => {
                if outcome.is_some() {
                    self.store.set_outcome(None)?; // a failed job goes on from its checkpoint
                }
                match self.newest_checkpoint() {
                    Some(c) => format!(
                        "coordinator restarted from {path}: the next generation resumes from checkpoint step {} ({})",
                        c.step, c.path
                    ),
                    None => format!("coordinator restarted from {path}: no committed checkpoint, the next generation starts afresh"),
                }
            }
        };
        let generation = self.generation.as_ref().map_or(0, |g| g.id);
        self.log_event(generation, "coordinator_restarted", detail)
    }
}
