//! Per-RPC bounds on request size. [`WireLimitLayer`] reads the length a request's gRPC frame
//! declares before any of the message is buffered or decoded and refuses one larger than its
//! RPC's content can be, so a broken or hostile client gets `RESOURCE_EXHAUSTED` for that call,
//! the coordinator allocates nothing for it, and the job goes on. `ReportMetrics` carries both
//! evaluation statistics (large) and training scalars (small): its handler refines the bound by
//! the report's kind ([`check`]).
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, BodyStream, StreamBody};
use mtl_proto::v1::{MetricsKind, MetricsReport};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::body::Body;
use tonic::Status;

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

/// The RPC a request path names and its bound; `None` for paths that are not ours (the router
/// answers those).
fn wire_limit(path: &str) -> Option<(&'static str, usize)> {
    let method = path.strip_prefix("/mtl.v1.Coordinator/")?;
    Some(match method {
        "Register" => ("Register", REGISTER_BYTES),
        "Heartbeat" => ("Heartbeat", HEARTBEAT_BYTES),
        "GetShard" => ("GetShard", GET_SHARD_BYTES),
        "ReportMetrics" => ("ReportMetrics", EVAL_METRICS_BYTES),
        "CommitCheckpoint" => ("CommitCheckpoint", COMMIT_CHECKPOINT_BYTES),
        "Leave" => ("Leave", LEAVE_BYTES),
        "GetStatus" => ("GetStatus", GET_STATUS_BYTES),
        _ => return None,
    })
}

/// gRPC's frame header: a compression flag and the message length (big-endian u32).
const FRAME_HEADER: usize = 5;

/// Refuses requests whose first gRPC frame declares more bytes than their RPC's bound.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WireLimitLayer;

impl<S> tower::Layer<S> for WireLimitLayer {
    type Service = WireLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WireLimit { inner }
    }
}

/// The service [`WireLimitLayer`] wraps around the gRPC routes.
#[derive(Clone, Debug)]
pub(crate) struct WireLimit<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for WireLimit<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone that was made ready is the one to call.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            let Some((rpc, limit)) = wire_limit(request.uri().path()) else {
                return inner.call(request).await;
            };
            let (parts, mut body) = request.into_parts();
            // Read frames until the header is in; keep them to hand on unchanged.
            let mut head = Vec::new();
            let mut header = Vec::with_capacity(FRAME_HEADER);
            while header.len() < FRAME_HEADER {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let take = (FRAME_HEADER - header.len()).min(data.len());
                            header.extend_from_slice(&data[..take]);
                        }
                        let end = !frame.is_data();
                        head.push(Ok::<_, Status>(frame));
                        if end {
                            break;
                        }
                    }
                    Some(Err(status)) => return Ok(status.into_http()),
                    None => break,
                }
            }
            if header.len() == FRAME_HEADER {
                let bytes = u32::from_be_bytes(header[1..].try_into().expect("4 bytes")) as usize;
                if bytes > limit {
                    tracing::warn!(rpc, bytes, limit, "refused an oversized request before reading it");
                    return Ok(Status::from(CoordinatorError::TooLarge { rpc, bytes, limit }).into_http());
                }
            }
            let rest = BodyStream::new(body);
            let body = Body::new(StreamBody::new(tokio_stream::iter(head).chain(rest)));
            inner.call(http::Request::from_parts(parts, body)).await
        })
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
