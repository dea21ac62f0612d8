//! Recovery without a restart. A lost worker (missed heartbeats, or not re-attached after a
//! coordinator restart) or a member whose collective failed ends the generation, but not the
//! job: the survivors keep their processes and their training state, register again with the
//! state they hold, and the next generation continues from the survivor with the most steps
//! (its *state root*), which every rank takes by broadcast. Survivors are at most one step
//! apart (an all-reduce completes on a rank only once every rank's contribution is in it), so
//! the most advanced one holds a state every rank could have reached: nothing is voted or
//! copied per step. Only when no registered worker holds state does the generation resume from
//! the newest committed checkpoint.
use std::time::{Duration, Instant};

use mtl_proto::v1::StateRoot;

use super::{Generation, JobState, Member, MemberState, Phase};
use crate::CoordinatorError;

/// The training state a registering survivor holds in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held {
    /// Optimizer steps it has completed.
    pub(crate) step: u64,
    /// The next sample it would train: `epoch_position` of `epoch`.
    pub(crate) epoch: u64,
    pub(crate) epoch_position: u64,
    /// The generation it trained in.
    pub(crate) generation: u64,
    /// Why it left that generation (its collective's error), when it noticed first.
    pub(crate) left_reason: String,
}

impl JobState {
    /// A member of the running generation registers again holding its state: its collective
    /// failed (a peer died or timed out). The generation ends and its members regroup.
    pub(super) fn member_left(
        &mut self,
        worker_id: &str,
        held: Option<&Held>,
        now: Instant,
    ) -> Result<(), CoordinatorError> {
        let Some(g) = &self.generation else { return Ok(()) };
        let rank = g.rank_of(worker_id).unwrap_or_default();
        let (step, why) = held.map_or((0, ""), |h| (h.step, h.left_reason.as_str()));
        let why = if why.is_empty() { "its collective failed" } else { why };
        let reason = format!(
            "worker `{worker_id}` (rank {rank}) left generation {} at step {step}: {why}{}",
            g.id,
            collective_positions(g)
        );
        self.end_for_regroup(reason, now)
    }

    /// Ends the running generation on a fault the job survives: its members are told to
    /// regroup, and the next generation has until `rendezvous.timeout_ms` to form.
    pub(super) fn end_for_regroup(&mut self, reason: String, now: Instant) -> Result<(), CoordinatorError> {
        if !matches!(self.phase, Phase::Running) {
            return Ok(());
        }
        self.end_generation(reason)?;
        self.ended_regroup = true;
        self.phase = Phase::Rendezvous;
        self.regroup_deadline = Some(now + Duration::from_millis(self.cfg.rendezvous.timeout_ms));
        Ok(())
    }

    /// Fails the job when a generation ended on a fault and no new one formed in time.
    pub(super) fn check_regroup_deadline(&mut self, now: Instant) -> Result<(), CoordinatorError> {
        let Some(deadline) = self.regroup_deadline else { return Ok(()) };
        if now < deadline || self.generation.is_some() || !matches!(self.phase, Phase::Rendezvous) {
            return Ok(());
        }
        self.regroup_deadline = None;
        let ended = self
            .ended
            .as_ref()
            .map_or_else(String::new, |(g, r)| format!("generation {} ended ({r}); ", g.id));
        let reason = format!(
            "{ended}no new generation formed within rendezvous.timeout_ms = {}: {} worker(s) registered, \
             rendezvous.min_workers = {}",
            self.cfg.rendezvous.timeout_ms,
            self.pending.len(),
            self.cfg.rendezvous.min_workers
        );
        self.fail(reason)
    }

    /// The state root of a generation forming from `members`: the one holding the most steps
    /// (the lowest rank among equals). Its data position also settles the epoch accounting of
    /// the generation it trained in, whose rank 0 may have been lost before reporting it.
    pub(super) fn state_root(&mut self, members: &[Member]) -> Result<Option<StateRoot>, CoordinatorError> {
        let best = members
            .iter()
            .enumerate()
            .filter_map(|(rank, m)| Some((rank, m, self.held.get(&m.info.worker_id)?.clone())))
            .fold(None, |best: Option<(usize, &Member, Held)>, c| match best {
                Some(b) if b.2.step >= c.2.step => Some(b),
                _ => Some(c),
            });
        let Some((rank, member, held)) = best else { return Ok(None) };
        if let Some(segment) = self.accounting.advance(held.generation, held.step) {
            self.store.put_segment(&segment)?;
        }
        Ok(Some(StateRoot {
            rank: rank as u32,
            worker_id: member.info.worker_id.clone(),
            step: held.step,
            epoch: held.epoch,
            epoch_position: held.epoch_position,
            generation: held.generation,
        }))
    }
}

/// Where each member of `g` last said it was in the generation's collectives, naming the
/// rank(s) behind the others: in a collective that timed out, the rank that noticed is rarely
/// the one that stalled. Empty when no member reported a sequence number.
pub(super) fn collective_positions(g: &Generation) -> String {
    let seqs: Vec<(usize, &Member)> =
        g.members.iter().enumerate().filter(|(_, m)| m.progress.collective_seq > 0).collect();
    let (Some(min), Some(max)) = (
        seqs.iter().map(|(_, m)| m.progress.collective_seq).min(),
        seqs.iter().map(|(_, m)| m.progress.collective_seq).max(),
    ) else {
        return String::new();
    };
    let each: Vec<String> = seqs
        .iter()
        .map(|(rank, m)| {
            let lost = if m.state == MemberState::Lost { ", lost" } else { "" };
            format!("rank {rank} at {}{lost}", m.progress.collective_seq)
        })
        .collect();
    let behind: Vec<String> = seqs
        .iter()
        .filter(|(_, m)| min < max && m.progress.collective_seq == min)
        .map(|(rank, m)| format!("rank {rank} (`{}`)", m.info.worker_id))
        .collect();
    let verdict = if behind.is_empty() { String::new() } else { format!("; behind: {}", behind.join(", ")) };
    format!(" (collective sequence: {}{verdict})", each.join(", "))
}
