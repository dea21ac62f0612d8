//! Per-RPC bounds on request size. The server decodes any message up to
//! [`mtl_proto::MAX_MESSAGE_BYTES`] (what evaluation statistics need); each handler then refuses
//! a request larger than its RPC's content can be, before it reads the token or touches the job,
//! so a broken or hostile client gets `RESOURCE_EXHAUSTED` for that call and the job goes on.
use mtl_proto::v1::{MetricsKind, MetricsReport};
use prost::Message;

use crate::CoordinatorError;

/// Identity, addresses and an NCCL id (128 bytes): a few hundred bytes in practice.
pub(crate) const REGISTER_BYTES: usize = 64 << 10;
/// A worker id, a token and a handful of integers.
pub(crate) const HEARTBEAT_BYTES: usize = 4 << 10;
/// A worker id, a token, a dataset fingerprint and integers.
pub(crate) const GET_SHARD_BYTES: usize = 4 << 10;
/// Training scalars: a few dozen named numbers.
pub(crate) const TRAIN_METRICS_BYTES: usize = 64 << 10;
/// Evaluation statistics of a validation shard: every detection, for exact COCO merging.
pub(crate) const EVAL_METRICS_BYTES: usize = mtl_proto::MAX_MESSAGE_BYTES;
/// A checkpoint path (at most a file system path, 4 KiB on Linux) and a config hash.
pub(crate) const COMMIT_CHECKPOINT_BYTES: usize = 16 << 10;
/// The reason a worker failed: an error message with its context.
pub(crate) const LEAVE_BYTES: usize = 64 << 10;
/// A token.
pub(crate) const GET_STATUS_BYTES: usize = 4 << 10;

/// The bound of a `ReportMetrics` request: evaluation statistics may be large, scalars are not.
pub(crate) fn metrics_bytes(report: &MetricsReport) -> usize {
    if report.kind() == MetricsKind::Eval {
        EVAL_METRICS_BYTES
    } else {
        TRAIN_METRICS_BYTES
    }
}

/// Refuses `request` to `rpc` when its encoded size passes `limit` bytes.
pub(crate) fn check(rpc: &'static str, request: &impl Message, limit: usize) -> Result<(), CoordinatorError> {
    let bytes = request.encoded_len();
    if bytes > limit {
        return Err(CoordinatorError::TooLarge { rpc, bytes, limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use mtl_proto::v1::{HeartbeatRequest, MetricsReport};
    use tonic::Code;

    use super::*;

    #[test]
    fn a_request_past_its_rpcs_bound_is_refused_naming_rpc_size_and_limit() {
        let small = HeartbeatRequest { worker_id: "w".into(), ..Default::default() };
        check("Heartbeat", &small, HEARTBEAT_BYTES).unwrap();
        let big = HeartbeatRequest { worker_id: "w".repeat(HEARTBEAT_BYTES), ..Default::default() };
        let err = check("Heartbeat", &big, HEARTBEAT_BYTES).unwrap_err();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), Code::ResourceExhausted);
        let want =
            format!("Heartbeat request of {} bytes exceeds its limit of 4096 bytes", big.encoded_len());
        assert!(status.message().contains(&want), "{}", status.message());
    }

    #[test]
    fn evaluation_statistics_may_be_large_scalars_may_not() {
        let eval = MetricsReport { kind: MetricsKind::Eval as i32, ..Default::default() };
        let train = MetricsReport { kind: MetricsKind::Train as i32, ..Default::default() };
        assert_eq!(metrics_bytes(&eval), mtl_proto::MAX_MESSAGE_BYTES);
        assert_eq!(metrics_bytes(&train), TRAIN_METRICS_BYTES);
        assert_eq!(metrics_bytes(&MetricsReport::default()), TRAIN_METRICS_BYTES, "unspecified: small");
    }
}
