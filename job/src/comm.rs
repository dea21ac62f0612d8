//! `[comm]`: how data-parallel ranks talk to each other.
use serde::{Deserialize, Serialize};

use crate::JobConfigError;

/// The collective backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// NCCL for CUDA devices, the TCP ring for CPU.
    Auto,
    /// The CPU TCP ring (reduce-scatter + all-gather).
    Ring,
    /// NCCL (CUDA tensors only).
    Nccl,
}

/// `[comm]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommSection {
    /// Collective backend: "auto" (from the device), "ring" or "nccl".
    pub backend: Backend,
    /// Gradients are packed into flat buckets of about this many bytes per all-reduce.
    pub bucket_bytes: u64,
    /// A collective transfer that makes no progress for this long fails (steady state).
    pub timeout_ms: u64,
    /// Bound on connecting to peers when a generation starts (peers start at different times).
    pub setup_timeout_ms: u64,
    /// All-reduce gradient buckets while backward runs, as soon as each is complete, where the
    /// step allows it (the CPU ring, one plain backward pass, no SyncBatchNorm:
    /// docs/ARCHITECTURE.md); otherwise after backward. It changes when values are reduced, not
    /// what is trained: not part of the config hash, and left out of the written config at its
    /// default.
    #[serde(skip_serializing_if = "crate::schema::is_true")]
    pub overlap: bool,
}

impl Default for CommSection {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            bucket_bytes: 25 << 20,
            timeout_ms: 60_000,
            setup_timeout_ms: 300_000,
            overlap: true,
        }
    }
}

impl CommSection {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), JobConfigError> {
        let invalid = |key: &str, message: String| JobConfigError::Invalid { key: key.into(), message };
        if self.bucket_bytes == 0 {
            return Err(invalid("comm.bucket_bytes", "must be positive".into()));
        }
        if self.timeout_ms == 0 || self.setup_timeout_ms == 0 {
            return Err(invalid("comm.timeout_ms", "timeouts must be positive".into()));
        }
        Ok(())
    }
}
