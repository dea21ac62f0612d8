//! Stopping on request (SIGTERM from Slurm or Kubernetes, SIGINT): the job is interrupted, not
//! finished and not failed, and resumes from the checkpoint of the step it stopped at.
//!
//! Asked to stop itself ([`JobState::request_stop`]), the coordinator answers every heartbeat of
//! the running generation with `DIRECTIVE_INTERRUPT`; the workers stop after a step they agree
//! on, rank 0 commits a checkpoint of it, and each leaves with `interrupted`. Workers that were
//! signalled themselves do the same without being told. Once every member has left, the
//! generation ends as interrupted ([`JobState::end_interrupted`]) and the job waits for
//! workers again: a coordinator that keeps running (only the workers were stopped) forms the
//! next generation from the committed checkpoint; a stopping one records the job as
//! interrupted and exits (`crate::run_with_stop`). A restarted coordinator treats an
//! interrupted job like one whose generation ended: the next generation resumes.
use super::{JobState, MemberState, Phase};
use crate::store::StoredOutcome;
use crate::CoordinatorError;

impl JobState {
    /// The coordinator was asked to stop (`why`, e.g. "SIGTERM"): tells the running
    /// generation's members to stop after a checkpoint. Returns whether there is a generation
    /// to wait for.
    pub(crate) fn request_stop(&mut self, why: &str) -> Result<bool, CoordinatorError> {
        if self.stopping.is_some() {
            return Ok(!self.stop_done());
        }
        let reason = format!(
            "the coordinator was asked to stop ({why}): finish the current step, commit a checkpoint of it and leave"
        );
        self.stopping = Some(reason.clone());
        let running = matches!(self.phase, Phase::Running) && self.generation.is_some();
        let generation = self.generation.as_ref().map_or(0, |g| g.id);
        let detail = if running {
            format!("{reason}; waiting up to server.stop_timeout_ms = {} ms", self.cfg.server.stop_timeout_ms)
        } else {
            format!("the coordinator was asked to stop ({why}); no generation is training")
        };
        self.log_event(generation, "stop_requested", detail)?;
        if !running {
            self.record_interrupted(format!("stopped on request ({why}) while no generation was training"))?;
        }
        Ok(running)
    }

    /// Whether a requested stop is complete: no generation is training any more.
    pub(crate) fn stop_done(&self) -> bool {
        self.stopping.is_some() && (self.generation.is_none() || !matches!(self.phase, Phase::Running))
    }

    /// The newest committed checkpoint's step, which the job resumes from.
    pub(crate) fn resume_step(&self) -> Option<u64> {
        self.newest_checkpoint().map(|c| c.step)
    }

    /// Every member of the running generation has left, at least one after a stop on request:
    /// the generation ends, and the job waits for workers to resume it.
    pub(super) fn end_interrupted(&mut self) -> Result<(), CoordinatorError> {
        let Some(g) = &self.generation else { return Ok(()) };
        let step = g.members.iter().map(|m| m.progress.step).max().unwrap_or_default();
        let checkpoint = match self.newest_checkpoint() {
            Some(c) if c.step == step => format!("checkpoint step {} ({}) committed", c.step, c.path),
            Some(c) => format!("the newest committed checkpoint is step {} ({})", c.step, c.path),
            None => "no checkpoint committed".into(),
        };
        let stopped: Vec<String> = g
            .members
            .iter()
            .filter(|m| m.state == MemberState::Interrupted)
            .map(|m| format!("`{}`", m.info.worker_id))
            .collect();
        let reason = format!(
            "interrupted: worker(s) {} stopped on request at step {step}; {checkpoint}; the job resumes from it",
            stopped.join(", ")
        );
        self.end_generation(reason.clone())?;
        self.phase = Phase::Rendezvous;
        if self.stopping.is_some() {
            self.record_interrupted(reason)?;
        }
        Ok(())
    }

    /// Records the job as interrupted (not finished, not failed): what a restarted coordinator
    /// and `sqlite3` see; the next generation still resumes from the newest checkpoint.
    fn record_interrupted(&mut self, reason: String) -> Result<(), CoordinatorError> {
        tracing::warn!(%reason, "job interrupted");
        self.store.set_outcome(Some(&StoredOutcome::Interrupted(reason)))
    }
}
