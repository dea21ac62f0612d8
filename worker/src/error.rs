/// What can go wrong in a worker. Messages name the address, file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The coordinator could not be reached.
    #[error("cannot connect to the coordinator at {addr}: {message}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why, with what to fix.
        message: String,
    },
    /// The coordinator answered an RPC with an error.
    #[error("coordinator rejected {rpc}: {}", mtl_proto::client::describe_status(status))]
    Rpc {
        /// The RPC's name.
        rpc: &'static str,
        /// The coordinator's answer.
        status: tonic::Status,
    },
    /// The job configuration is invalid.
    #[error(transparent)]
    Config(#[from] mtl_job::JobConfigError),
    /// A LibTorch operation failed.
    #[error("torch: {}", torch_message(.0))]
    Torch(#[from] tch::TchError),
    /// A LibTorch operation failed in the named layer, head, loss or decoder: a tensor shape
    /// that does not fit (labels outside the model's label space, an input of the wrong size)
    /// or the device running out of memory.
    #[error("{at}: {}", torch_message(.source))]
    TorchAt {
        /// Where: `backbone layer3.0`, `detection head`, `segmentation loss`, ...
        at: String,
        /// LibTorch's error.
        source: tch::TchError,
    },
    /// Training panicked: a tch call without a `Result` hit a LibTorch error (CUDA out of
    /// memory, a shape mismatch) or an invariant broke.
    #[error("training stopped on an unexpected error: {message}")]
    Panicked {
        /// The panic's message.
        message: String,
    },
    /// The device string is not `cpu` or `cuda:N`, or that device is not available.
    #[error("device `{device}`: {message}")]
    Device {
        /// The device as given.
        device: String,
        /// What is wrong.
        message: String,
    },
    /// A collective (all-reduce, broadcast) with the other ranks failed.
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
    /// A weights file could not be read or does not fit the model.
    #[error("weights {path}: `{name}`: {message}")]
    Weights {
        /// The file.
        path: std::path::PathBuf,
        /// The tensor at fault (empty when the file itself could not be read).
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The model cannot be built from this configuration and dataset.
    #[error("cannot build the model: `{key}`: {message}")]
    Model {
        /// The config key or dataset field at fault.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The job's data cannot serve training or evaluation as configured (a split missing or
    /// too small for the batch).
    #[error("data: `{key}`: {message}")]
    Data {
        /// The config key at fault.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A peer advertised an address this worker cannot connect to.
    #[error("rank {rank} ({device}) advertised peer address `{addr}`, not host:port")]
    PeerAddress {
        /// The peer's rank.
        rank: u32,
        /// The peer's device.
        device: String,
        /// The address as advertised.
        addr: String,
    },
    /// Saved optimiser or task-weighting state does not fit the live one.
    #[error("cannot load {owner} state `{key}`: {message}")]
    State {
        /// Whose state: `model`, `optimizer`, `sgd`, `adamw`, `weighting`.
        owner: &'static str,
        /// The state entry at fault.
        key: String,
        /// What is missing or mismatched (shapes, counts).
        message: String,
    },
    /// A checkpoint cannot be used: none found, incomplete, corrupt, or from another job.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint (or the directory searched).
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Writing a checkpoint failed. The checkpoints written before are untouched.
    #[error("cannot write checkpoint: {path}: {source}")]
    CheckpointWrite {
        /// The file or directory that could not be written.
        path: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Task weighting was asked for something its inputs cannot give.
    #[error("task weighting ({strategy}): {message}")]
    Weighting {
        /// The strategy, as in `weighting.strategy`.
        strategy: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Metric statistics could not be accumulated or merged.
    #[error("metrics: {message}")]
    Metrics {
        /// The metrics crate's message.
        message: String,
    },
    /// The coordinator told this worker to stop.
    #[error("stopped by the coordinator: {reason}")]
    Stopped {
        /// The coordinator's reason.
        reason: String,
    },
    /// The coordinator ended this worker's generation (a peer was lost or its collective
    /// failed) while the job goes on: the worker regroups into the next one.
    #[error("generation {generation} ended: {reason}")]
    GenerationEnded {
        /// The generation that ended.
        generation: u64,
        /// The coordinator's reason.
        reason: String,
    },
    /// An annotation file (COCO JSON, JSONL manifest, dataset info) is malformed.
    #[error("{path}: {location}: {message}")]
    Annotation {
        /// The annotation file.
        path: std::path::PathBuf,
        /// Where in the file: `line 3, field boxes[1]` or `annotations[5].bbox`.
        location: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// A dataset file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An image could not be encoded or written (`gen-data`).
    #[error("cannot write image {path}: {source}")]
    ImageWrite {
        /// The image file.
        path: std::path::PathBuf,
        /// Why.
        source: image::ImageError,
    },
    /// The loader was asked for something the dataset cannot give.
    #[error("data loader: {message}")]
    Loader {
        /// What is wrong.
        message: String,
    },
}

/// LibTorch's message without the C++ stack trace it appends (`Exception raised from ...` and
/// a frame a line): the first lines say what failed; the frames are LibTorch's internals.
fn torch_message(err: &tch::TchError) -> String {
    let text = err.to_string();
    match text.find("\nException raised from") {
        Some(end) => text[..end].to_string(),
        None => text,
    }
}

impl WorkerError {
    /// Names where a bare LibTorch error ([`WorkerError::Torch`]) happened; any other error,
    /// one that already says where included, passes unchanged (the innermost place wins).
    pub(crate) fn at(self, at: &str) -> Self {
        match self {
            WorkerError::Torch(source) => WorkerError::TorchAt { at: at.to_string(), source },
            other => other,
        }
    }
}

/// [`WorkerError::at`] on results: `layer.forward(x).at("neck")?`.
pub(crate) trait At<T> {
    /// Names where a LibTorch error in this result happened.
    fn at(self, at: &str) -> Result<T, WorkerError>;
}

impl<T, E: Into<WorkerError>> At<T> for Result<T, E> {
    fn at(self, at: &str) -> Result<T, WorkerError> {
        self.map_err(|e| e.into().at(at))
    }
}
