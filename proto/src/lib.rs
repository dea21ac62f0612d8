//! The wire contract between coordinator and workers: `mtl.v1`, generated from
//! `proto/mtl/v1/coordinator.proto` at build time. Nothing generated is committed.

pub mod client;

/// Version 1 of the coordinator service and its messages.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    tonic::include_proto!("mtl.v1");
}

/// Largest message either side accepts. Evaluation statistics of a validation shard (every
/// detection of every image, for exact COCO merging) are megabytes, past gRPC's 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
