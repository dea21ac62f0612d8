use tonic::Status;

/// What can go wrong in the coordinator. Mapped to a gRPC status in exactly one place.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The request's job token does not match the job's.
    #[error("job token does not match this job")]
    BadToken,
    /// A registration arrived while a generation is running and no place is free.
    #[error("job `{job}` is running generation {generation} with {world_size} workers (max_workers = {max}); worker `{worker_id}` cannot join")]
    Full {
        /// The job's name.
        job: String,
        /// The running generation.
        generation: u64,
        /// Its size.
        world_size: u32,
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
    /// The job has already finished or failed.
    #[error("job is {state}")]
    JobOver {
        /// "finished" or "failed".
        state: &'static str,
    },
    /// A file the coordinator writes (the metrics history) could not be opened.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
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
            CoordinatorError::Full { .. } => Status::resource_exhausted(message),
            CoordinatorError::RendezvousTimeout { .. } => Status::deadline_exceeded(message),
            CoordinatorError::UnknownWorker { .. } => Status::failed_precondition(message),
            CoordinatorError::InvalidRequest { .. } => Status::invalid_argument(message),
            CoordinatorError::JobOver { .. } => Status::failed_precondition(message),
            CoordinatorError::DatasetMismatch { .. } => Status::failed_precondition(message),
            CoordinatorError::Transport(_) | CoordinatorError::Io { .. } => Status::internal(message),
        }
    }
}
