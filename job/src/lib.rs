//! The job configuration: what to train, on what, with how many workers.
//!
//! The coordinator owns it (it loads the file and sends it to every worker as TOML); a worker
//! in `--standalone` mode loads it itself. Both go through [`JobConfig::load`], which layers
//! serde defaults → the TOML file → `MTL_SECTION__KEY` environment variables → `section.key=value`
//! overrides from flags, rejects unknown keys and wrong types with the key's full path, and
//! finally runs [`JobConfig::validate`] for invariants that span fields.
#![warn(missing_docs)]

mod checkpoint;
mod comm;
mod data;
mod error;
mod model;
mod optim;
mod schema;
pub mod sharding;
pub mod splitmix;
mod token;

pub use checkpoint::*;
pub use comm::*;
pub use data::*;
pub use error::JobConfigError;
pub use model::*;
pub use optim::*;
pub use schema::*;
pub use token::{JobToken, TOKEN_ENV};

use std::path::Path;

/// Environment variables with this prefix override config keys: `MTL_TRAIN__STEPS=10`.
pub const ENV_PREFIX: &str = "MTL";

impl JobConfig {
    /// Loads and validates a job configuration.
    ///
    /// `file` is optional (defaults + overrides can make a complete job), `overrides` are
    /// `section.key=value` strings as given on a command line, and `env` supplies the
    /// environment (pass `std::env::vars()`; tests pass their own).
    pub fn load(
        file: Option<&Path>,
        overrides: &[String],
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, JobConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(JobConfigError::MissingFile { path: path.to_owned() });
            }
            builder =
                builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
        }
        let prefix = format!("{ENV_PREFIX}_");
        let env: config::Map<String, String> =
            env.into_iter().filter(|(k, _)| k.starts_with(&prefix) && k.contains("__")).collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        for item in overrides {
            let (key, value) =
                item.split_once('=').ok_or_else(|| JobConfigError::BadOverride { item: item.clone() })?;
            builder = builder
                .set_override(key.trim(), parse_scalar(value.trim()))
                .map_err(|e| JobConfigError::Load { message: e.to_string() })?;
        }
        let merged = builder.build().map_err(|e| JobConfigError::Load { message: e.to_string() })?;
        let cfg: JobConfig = serde_path_to_error::deserialize(merged).map_err(JobConfigError::from_serde)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a configuration received as TOML (from the coordinator) and validates it.
    pub fn from_toml(text: &str) -> Result<Self, JobConfigError> {
        let de =
            toml::Deserializer::parse(text).map_err(|e| JobConfigError::Load { message: e.to_string() })?;
        let cfg: JobConfig = serde_path_to_error::deserialize(de).map_err(JobConfigError::from_serde)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration as TOML, as sent to workers and written into checkpoints; the token
    /// is written as `""` (see [`JobToken`]).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JobConfig always serialises")
    }

    /// A short hash of what determines the trained model, stored in checkpoints and in the
    /// coordinator's store to detect a changed job. It leaves out the secret (`job.token`) and
    /// the sections that say where and how the job runs rather than what it trains
    /// (`[server]`, `[rendezvous]`, `[checkpoint]`, `data.max_unreadable_fraction`,
    /// `data.cache_decoded`, the kernel choices `train.cudnn_benchmark`, `train.channels_last`
    /// and `train.cuda_graphs`, and `comm.overlap`), so a coordinator restarted on another port,
    /// with another world size, another `keep_last`, a higher tolerance for unreadable images,
    /// the decoded-image cache, a kernel choice or the gradient overlap switched still resumes.
    pub fn hash(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.trained_part().to_toml().as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// The part of the job that [`JobConfig::hash`] covers: this config with the token cleared
    /// and `[server]`, `[rendezvous]`, `[checkpoint]`, `data.max_unreadable_fraction`,
    /// `data.cache_decoded`, `train.cudnn_benchmark`, `train.channels_last`, `train.cuda_graphs`
    /// and `comm.overlap` at their defaults.
    pub fn trained_part(&self) -> JobConfig {
        let mut trained = self.clone();
        trained.job.token = JobToken::default();
        trained.server = ServerSection::default();
        trained.rendezvous = RendezvousSection::default();
        trained.checkpoint = CheckpointSection::default();
        trained.data.max_unreadable_fraction = crate::DataSection::default().max_unreadable_fraction;
        trained.data.cache_decoded = crate::DataSection::default().cache_decoded;
        let train = crate::TrainSection::default();
        (trained.train.cudnn_benchmark, trained.train.channels_last, trained.train.cuda_graphs) =
            (train.cudnn_benchmark, train.channels_last, train.cuda_graphs);
        trained.comm.overlap = crate::CommSection::default().overlap;
        trained
    }
}

/// Values from `--set key=value` are typed like TOML scalars so `steps=10` is a number.
fn parse_scalar(value: &str) -> config::Value {
    if let Ok(v) = value.parse::<i64>() {
        return v.into();
    }
    if let Ok(v) = value.parse::<f64>() {
        return v.into();
    }
    match value {
        "true" => true.into(),
        "false" => false.into(),
        _ => value.trim_matches('"').to_string().into(),
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
