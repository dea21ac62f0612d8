//! The schema of a job file. Every field is documented; unknown keys are errors.
use serde::{Deserialize, Serialize};

use crate::data::DataSection;
use crate::model::{ModelSection, TasksSection};
use crate::{JobConfigError, OptimizerKind, WeightingSection};

/// A whole job: one multi-task training run over one or more workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Identity and reproducibility of the job.
    pub job: JobSection,
    /// Where the coordinator listens.
    #[serde(default)]
    pub server: ServerSection,
    /// How workers join and how liveness is checked.
    #[serde(default)]
    pub rendezvous: RendezvousSection,
    /// The optimisation schedule.
    #[serde(default)]
    pub train: TrainSection,
    /// How ranks talk to each other.
    #[serde(default)]
    pub comm: crate::CommSection,
    /// The dataset, its loader and augmentation.
    #[serde(default)]
    pub data: DataSection,
    /// The network: backbone, normalisation, FPN width, pretrained weights.
    #[serde(default)]
    pub model: ModelSection,
    /// Which task heads are built and how detections are decoded.
    #[serde(default)]
    pub tasks: TasksSection,
    /// How per-task losses are weighted or their gradients combined.
    #[serde(default)]
    pub weighting: WeightingSection,
    /// Where checkpoints go, how often, how many are kept.
    #[serde(default)]
    pub checkpoint: crate::CheckpointSection,
}

/// `[job]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Name of the job, shown in logs and status (required).
    pub name: String,
    /// Shared secret every RPC must carry. Never written: a serialised config has `""`. Empty
    /// here means the coordinator takes it from `MTL_JOB_TOKEN` or `--token-file`, or
    /// generates one (docs/SECURITY.md).
    #[serde(default)]
    pub token: crate::JobToken,
    /// Seed for parameter init, data order and augmentation.
    #[serde(default)]
    pub seed: u64,
}

/// `[server]` (coordinator only)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Address the coordinator's gRPC server binds, `host:port` (port 0 picks a free one).
    pub listen: String,
    /// Every metrics point (train losses, merged evaluations) is appended here as a JSON line;
    /// empty means `runs/<job.name>/metrics.jsonl`. An export: the state database has them too.
    pub metrics_file: String,
    /// The job's durable state (SQLite): generations, epoch accounting, committed checkpoints,
    /// metrics history. A coordinator started on an existing one resumes the job. Empty means
    /// `runs/<job.name>/state.db`.
    pub state_db: String,
    /// TLS for the gRPC server: its certificate chain (PEM). With `tls_key`; empty means plain
    /// HTTP/2 (docs/SECURITY.md). Left out of the written config when empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tls_cert: String,
    /// The private key (PEM) of `tls_cert`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tls_key: String,
    /// Mutual TLS: only clients with a certificate signed by this CA (PEM) are served.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tls_client_ca: String,
    /// Address of the coordinator's HTTP server: the dashboard at `/`, Prometheus metrics at
    /// `/metrics`, the status as JSON at `/api/status`; read-only. Empty turns it off. The
    /// default, loopback on a free port, is logged at start (docs/SECURITY.md: who can reach it).
    /// This key and the next are left out of a written config at their defaults, so that job
    /// hashes from before they existed still match.
    #[serde(skip_serializing_if = "is_default_http_listen")]
    pub http_listen: String,
    /// Whether `/metrics` and `/api/status` require the job token as `Authorization: Bearer`.
    /// On by default: other users of a shared node reach its loopback address too.
    #[serde(skip_serializing_if = "is_default_http_require_token")]
    pub http_require_token: bool,
    /// TensorBoard event files (training losses, task weights, learning rate, images/s, every
    /// merged evaluation metric, generation changes) go into this directory; empty means `tb/`
    /// next to the state database (`runs/<job.name>/tb` by default), `"off"` writes none.
    /// Left out of the written config when empty, so job hashes from before the key existed
    /// still match.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tensorboard_dir: String,
    /// Asked to stop (SIGTERM or SIGINT), the coordinator tells the workers to finish their step
    /// and commit a checkpoint, and waits this long for them to leave before it exits anyway.
    /// Keep it under the grace period of whatever sends the signal (Kubernetes'
    /// `terminationGracePeriodSeconds`, Slurm's `KillWait`; both 30 s by default). Left out of
    /// the written config at its default, so job hashes from before the key existed still match.
    #[serde(skip_serializing_if = "is_default_stop_timeout")]
    pub stop_timeout_ms: u64,
}

/// `server.http_listen` when not given: loopback, a free port.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:0";

fn is_default_http_listen(addr: &String) -> bool {
    addr == DEFAULT_HTTP_LISTEN
}

fn is_default_http_require_token(required: &bool) -> bool {
    *required
}

/// Whether `ms` is `server.stop_timeout_ms`'s default.
fn is_default_stop_timeout(ms: &u64) -> bool {
    *ms == ServerSection::default().stop_timeout_ms
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            metrics_file: String::new(),
            state_db: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_client_ca: String::new(),
            http_listen: DEFAULT_HTTP_LISTEN.into(),
            http_require_token: true,
            tensorboard_dir: String::new(),
            stop_timeout_ms: 20_000,
        }
    }
}

impl ServerSection {
    /// Where metrics go, with the default resolved.
    pub fn metrics_path(&self, job_name: &str) -> std::path::PathBuf {
        if self.metrics_file.is_empty() {
            std::path::Path::new("runs").join(job_name).join("metrics.jsonl")
        } else {
            self.metrics_file.clone().into()
        }
    }

    /// Where the state database lives, with the default resolved.
    pub fn state_db_path(&self, job_name: &str) -> std::path::PathBuf {
        if self.state_db.is_empty() {
            std::path::Path::new("runs").join(job_name).join("state.db")
        } else {
            self.state_db.clone().into()
        }
    }

    /// Where the coordinator keeps the token it generated for a job given none: `token` next
    /// to the state database (`runs/<job.name>/token` by default), so that a coordinator
    /// restarted on the same state reuses it.
    pub fn token_path(&self, job_name: &str) -> std::path::PathBuf {
        self.state_db_path(job_name).with_file_name("token")
    }

    /// Where TensorBoard event files go, with the default resolved: `tb/` next to the state
    /// database, like the token; `None` when `tensorboard_dir = "off"`.
    pub fn tensorboard_path(&self, job_name: &str) -> Option<std::path::PathBuf> {
        match self.tensorboard_dir.as_str() {
            "off" => None,
            "" => Some(self.state_db_path(job_name).with_file_name("tb")),
            dir => Some(dir.into()),
        }
    }
}

/// `[rendezvous]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RendezvousSection {
    /// Workers needed before a generation forms.
    pub min_workers: u32,
    /// Workers admitted at most; 0 means equal to `min_workers`.
    pub max_workers: u32,
    /// How long a registering worker waits for the generation to form.
    pub timeout_ms: u64,
    /// Once `min_workers` have registered, wait this long for more (up to `max_workers`) before
    /// forming the generation (torchrun's "last call"); reaching `max_workers` forms it at once.
    pub last_call_ms: u64,
    /// How often workers send heartbeats.
    pub heartbeat_interval_ms: u32,
    /// A worker silent for this long is marked lost.
    pub heartbeat_timeout_ms: u64,
    /// A restarted coordinator waits this long for the workers of the generation that was
    /// running to re-attach (register again with that generation) before it gives up on
    /// them; workers retry an unreachable coordinator for as long.
    pub coordinator_grace_ms: u64,
}

impl Default for RendezvousSection {
    fn default() -> Self {
        Self {
            min_workers: 1,
            max_workers: 0,
            timeout_ms: 300_000,
            last_call_ms: 3_000,
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 30_000,
            coordinator_grace_ms: 60_000,
        }
    }
}

impl RendezvousSection {
    /// `max_workers` with its default resolved.
    pub fn max_workers(&self) -> u32 {
        if self.max_workers == 0 {
            self.min_workers
        } else {
            self.max_workers
        }
    }
}

/// `[train]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Optimizer steps to run.
    pub steps: u64,
    /// Samples per step on each rank.
    pub batch_size: u32,
    /// Peak learning rate.
    pub lr: f64,
    /// `sgd` or `adamw`.
    pub optimizer: OptimizerKind,
    /// SGD momentum factor, in [0, 1).
    pub momentum: f64,
    /// SGD Nesterov momentum (needs `momentum` > 0).
    pub nesterov: bool,
    /// Weight decay (L2 added to the gradient for SGD, decoupled for AdamW); never applied to
    /// biases and normalisation weights.
    pub weight_decay: f64,
    /// AdamW's `(beta1, beta2)`.
    pub betas: [f64; 2],
    /// AdamW's denominator epsilon.
    pub eps: f64,
    /// Steps of linear learning-rate warmup from 0 to `lr`.
    pub warmup_steps: u64,
    /// The cosine decay ends at `min_lr_ratio * lr` at step `steps`.
    pub min_lr_ratio: f64,
    /// Clip the global gradient L2 norm to this value; 0 turns clipping off.
    pub clip_grad_norm: f64,
    /// Report training losses (averaged over ranks) every this many steps.
    pub log_every_steps: u64,
    /// Evaluate on the validation split every this many steps; 0 = only at the end.
    pub eval_every_steps: u64,
    /// "fp32", or "bf16": the forward pass and losses under bf16 autocast (backward, weights
    /// and optimizer state stay fp32). Meant for CUDA; on CPU it works but is rarely faster.
    pub precision: Precision,
    /// Let cuDNN time its convolution algorithms for each new input shape and keep the fastest
    /// (`torch.backends.cudnn.benchmark`); CUDA only. Shapes are fixed in training, so the cost
    /// is the first steps'. It chooses kernels, not what is trained: not part of the config hash,
    /// and left out of the written config at its default.
    #[serde(skip_serializing_if = "is_true")]
    pub cudnn_benchmark: bool,
    /// Lay out convolution weights and input images channels_last (NHWC), which tensor-core
    /// convolutions prefer, notably with bf16. Off until measured on our GPUs (docs/PERFORMANCE.md).
    /// Like `cudnn_benchmark`, not part of the config hash and left out of the written config at
    /// its default.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub channels_last: bool,
    /// Capture the training step in a CUDA graph after a few eager steps and replay it for every
    /// full batch (one launch instead of thousands of kernels). CUDA only; standalone training
    /// (`worker run` trains eagerly), `weighting.strategy` fixed or uncertainty, and not with
    /// SyncBatchNorm.
    /// Off until measured on our GPUs (docs/PERFORMANCE.md). Like `cudnn_benchmark`, not part
    /// of the config hash and left out of the written config at its default.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cuda_graphs: bool,
}

pub(crate) fn is_true(value: &bool) -> bool {
    *value
}

/// Numeric precision of the training forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in fp32.
    #[default]
    Fp32,
    /// bf16 autocast for forward and losses.
    Bf16,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 1,
            batch_size: 8,
            lr: 0.01,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            clip_grad_norm: 0.0,
            log_every_steps: 10,
            eval_every_steps: 0,
            precision: Precision::Fp32,
            cudnn_benchmark: true,
            channels_last: false,
            cuda_graphs: false,
        }
    }
}

impl JobConfig {
    /// Checks invariants that serde cannot: ranges and relations between fields.
    pub fn validate(&self) -> Result<(), JobConfigError> {
        let invalid = |key: &str, message: String| JobConfigError::Invalid { key: key.into(), message };
        if self.job.name.trim().is_empty() {
            return Err(invalid("job.name", "must not be empty".into()));
        }
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "server.listen",
                format!("`{}` is not a socket address like 127.0.0.1:50051", self.server.listen),
            ));
        }
        let s = &self.server;
        if s.tls_cert.is_empty() != s.tls_key.is_empty() {
            let (given, missing) =
                if s.tls_cert.is_empty() { ("tls_key", "tls_cert") } else { ("tls_cert", "tls_key") };
            return Err(invalid(
                &format!("server.{missing}"),
                format!("must be set with server.{given} (TLS needs a certificate and its key)"),
            ));
        }
        if !s.tls_client_ca.is_empty() && s.tls_cert.is_empty() {
            return Err(invalid("server.tls_client_ca", "needs server.tls_cert and server.tls_key".into()));
        }
        if !self.server.http_listen.is_empty()
            && self.server.http_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "server.http_listen",
                format!(
                    "`{}` is not a socket address like 127.0.0.1:8051 (empty turns the HTTP server off)",
                    self.server.http_listen
                ),
            ));
        }
        let r = &self.rendezvous;
        if r.min_workers == 0 {
            return Err(invalid("rendezvous.min_workers", "must be at least 1, got 0".into()));
        }
        if r.max_workers != 0 && r.max_workers < r.min_workers {
            return Err(invalid(
                "rendezvous.max_workers",
                format!("{} is below rendezvous.min_workers = {}", r.max_workers, r.min_workers),
            ));
        }
        if r.heartbeat_interval_ms == 0 || u64::from(r.heartbeat_interval_ms) >= r.heartbeat_timeout_ms {
            return Err(invalid(
                "rendezvous.heartbeat_interval_ms",
                format!(
                    "{} must be positive and below rendezvous.heartbeat_timeout_ms = {}",
                    r.heartbeat_interval_ms, r.heartbeat_timeout_ms
                ),
            ));
        }
        let t = &self.train;
        if t.batch_size == 0 {
            return Err(invalid("train.batch_size", "must be at least 1, got 0".into()));
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(invalid("train.lr", format!("must be a positive number, got {}", t.lr)));
        }
        self.data.validate()?;
        self.comm.validate()?;
        self.model.validate()?;
        self.tasks.validate()?;
        t.validate_optim()?;
        self.weighting.validate()?;
        if t.cuda_graphs {
            use crate::{NormKind, WeightingStrategy};
            if !matches!(self.weighting.strategy, WeightingStrategy::Fixed | WeightingStrategy::Uncertainty) {
                return Err(invalid(
                    "train.cuda_graphs",
                    format!(
                        "needs weighting.strategy fixed or uncertainty, got {}: the others decide on the host \
                         between steps, which a captured step cannot",
                        format!("{:?}", self.weighting.strategy).to_lowercase()
                    ),
                ));
            }
            if self.model.norm == NormKind::SyncBatch {
                return Err(invalid(
                    "train.cuda_graphs",
                    "cannot capture model.norm = \"sync_batch\" (its all-reduce runs outside LibTorch's streams)"
                        .into(),
                ));
            }
        }
        self.checkpoint.validate()?;
        Ok(())
    }
}
