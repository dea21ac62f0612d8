use tonic::Status;

/// What can go wrong in the coordinator. Mapped to a gRPC status in exactly one place.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The request's job token does not match the job's.
    #[error("job token does not match this job")]
    BadToken,
    /// A registration arrived while a generation is running and no place is free.
    #[error("job `{job}` is running generation {generation} with {world_size} workers and {waiting} waiting to join (max_workers = {max}); worker `{worker_id}` cannot join")]
    Full {
        /// The job's name.
        job: String,
        /// The running generation.
        generation: u64,
        /// Its size.
        world_size: u32,
        /// Workers already waiting for admission.
        waiting: u32,
        /// `rendezvous.max_workers`.
        max: u32,
        /// Who asked.
        worker_id: String,
    },
    /// Too few workers registered within `rendezvous.timeout_ms`.
    #[error("rendezvous timed out after {timeout_ms} ms with {registered} of {min_workers} workers")]
    RendezvousTimeout {
        /// The configured timeout.
        timeout_ms: u64,
        /// Workers that did register.
        registered: usize,
        /// Workers required.
        min_workers: u32,
    },
    /// A request names a worker that is not part of the current generation.
    #[error("worker `{worker_id}` is not in generation {generation}")]
    UnknownWorker {
        /// Who asked.
        worker_id: String,
        /// The generation the request named.
        generation: u64,
    },
    /// A request of a member of a generation that ended while the job goes on (a lost worker,
    /// a failed collective, an admission): not an error of the worker, it should regroup.
    #[error("generation {generation} ended ({reason}); worker `{worker_id}` should regroup: abort the collective and register holding its state")]
    GenerationEnded {
        /// Who asked.
        worker_id: String,
        /// The generation the request named.
        generation: u64,
        /// Why it ended.
        reason: String,
    },
    /// A worker asked to re-attach to a generation that is not running (any more).
    #[error("worker `{worker_id}` asked to re-attach to generation {generation}, but the coordinator runs {current}: register with generation 0 to join the next one")]
    StaleGeneration {
        /// Who asked.
        worker_id: String,
        /// The generation it named.
        generation: u64,
        /// What runs now ("generation N" or "no generation").
        current: String,
    },
    /// A checkpoint was written for another job configuration.
    #[error("checkpoint {path} was written with config hash {theirs}, this job's is {ours}")]
    ConfigHashMismatch {
        /// The checkpoint as reported.
        path: String,
        /// Its config hash.
        theirs: String,
        /// The job's.
        ours: String,
    },
    /// A request field is malformed.
    #[error("invalid request field `{field}`: {message}")]
    InvalidRequest {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Two workers see different data for the same split.
    #[error("worker `{worker_id}` sees different {split} data than `{first_worker}`: {detail}; every worker must read the same dataset")]
    DatasetMismatch {
        /// The split.
        split: &'static str,
        /// Who asked.
        worker_id: String,
        /// The first worker that reported this split.
        first_worker: String,
        /// Both sides' sample counts and index fingerprints.
        detail: String,
    },
    /// The coordinator was asked to stop (see `state::stop`): it forms no new generation.
    #[error("the coordinator is stopping ({why}); register again once it serves the job again")]
    Stopping {
        /// Why it stops.
        why: String,
    },
    /// The job has already finished or failed.
    #[error("job is {state}")]
    JobOver {
        /// "finished" or "failed".
        state: &'static str,
    },
    /// The state database failed.
    #[error("state database {path}: {message}")]
    Store {
        /// The database file.
        path: std::path::PathBuf,
        /// What was being done and the SQLite error.
        message: String,
    },
    /// The state database belongs to another job, or to another version of the coordinator.
    #[error("state database {path} cannot be used: {message}")]
    StoreMismatch {
        /// The database file.
        path: std::path::PathBuf,
        /// Whose it is.
        message: String,
    },
    /// A file the coordinator writes (the metrics history) could not be opened.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The job's token file could not be written or read back.
    #[error("job token file {path}: {message}")]
    TokenFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        message: String,
    },
    /// A TLS file of `[server]` cannot be used.
    #[error("{key} = {path}: {message}")]
    Tls {
        /// The config key.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        message: String,
    },
    /// `coordinator status` could not reach the coordinator or its answer was an error.
    #[error("coordinator at {addr}: {message}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// Why.
        message: String,
    },
    /// A request is larger than its RPC's bound (`limits`); the call is refused, the job goes on.
    #[error("{rpc} request of {bytes} bytes exceeds its limit of {limit} bytes")]
    TooLarge {
        /// The RPC.
        rpc: &'static str,
        /// The request's encoded size.
        bytes: usize,
        /// The RPC's bound.
        limit: usize,
    },
    /// The HTTP server (dashboard, metrics) cannot listen on `server.http_listen`.
    #[error("cannot listen on server.http_listen = {addr}: {source}")]
    HttpListen {
        /// The configured address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed (bind, transport).
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<CoordinatorError> for Status {
    fn from(err: CoordinatorError) -> Self {
        let message = err.to_string();
        match err {
            CoordinatorError::BadToken => Status::unauthenticated(message),
            CoordinatorError::Full { .. } | CoordinatorError::TooLarge { .. } => {
                Status::resource_exhausted(message)
            }
            CoordinatorError::RendezvousTimeout { .. } => Status::deadline_exceeded(message),
            CoordinatorError::Stopping { .. } => Status::unavailable(message),
            CoordinatorError::UnknownWorker { .. } => Status::failed_precondition(message),
            CoordinatorError::GenerationEnded { .. } => Status::aborted(message),
            CoordinatorError::InvalidRequest { .. } => Status::invalid_argument(message),
            CoordinatorError::JobOver { .. } => Status::failed_precondition(message),
            CoordinatorError::DatasetMismatch { .. } => Status::failed_precondition(message),
            CoordinatorError::StaleGeneration { .. } => Status::failed_precondition(message),
            CoordinatorError::ConfigHashMismatch { .. } => Status::failed_precondition(message),
            CoordinatorError::Transport(_)
            | CoordinatorError::Unreachable { .. }
            | CoordinatorError::Io { .. }
            | CoordinatorError::HttpListen { .. }
            | CoordinatorError::TokenFile { .. }
            | CoordinatorError::Tls { .. }
            | CoordinatorError::Store { .. }
            | CoordinatorError::StoreMismatch { .. } => Status::internal(message),
        }
    }
}
