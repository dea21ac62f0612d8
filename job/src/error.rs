use std::path::PathBuf;

/// Why a job configuration could not be loaded. Every variant names the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum JobConfigError {
    /// The config file given does not exist.
    #[error("config file {path} does not exist")]
    MissingFile {
        /// The path as given.
        path: PathBuf,
    },
    /// The file could not be read or parsed as TOML, or a source could not be merged.
    #[error("cannot load job config: {message}")]
    Load {
        /// The underlying message, which names the file and position.
        message: String,
    },
    /// A `--set` item was not of the form `section.key=value`.
    #[error("override `{item}` is not of the form section.key=value")]
    BadOverride {
        /// The item as given.
        item: String,
    },
    /// A key that the schema does not have.
    #[error("unknown config key `{key}` (expected one of: {expected})")]
    UnknownKey {
        /// Full dotted path of the offending key.
        key: String,
        /// The keys valid at that place.
        expected: String,
    },
    /// A required key is absent.
    #[error("missing required config key `{key}`")]
    MissingKey {
        /// Full dotted path of the missing key.
        key: String,
    },
    /// A key has a value of the wrong type or out of range.
    #[error("invalid value for config key `{key}`: {message}")]
    Invalid {
        /// Full dotted path of the key.
        key: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// A token file could not be read or is empty.
    #[error("job token file {path}: {message}")]
    TokenFile {
        /// The file as given.
        path: PathBuf,
        /// Why it cannot be used.
        message: String,
    },
}

impl JobConfigError {
    /// Turns a deserialisation error into one that names the key by its full path.
    pub(crate) fn from_serde<E: std::fmt::Display>(err: serde_path_to_error::Error<E>) -> Self {
        let parent = err.path().to_string();
        let message = err.inner().to_string();
        let join = |name: &str| {
            if parent == "." || parent.is_empty() {
                name.to_string()
            } else {
                format!("{parent}.{name}")
            }
        };
        // Strip the config crate's own "for key ..." suffix: we name the key ourselves.
        let message = message.split(" for key ").next().unwrap_or(&message).to_string();
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
            let expected = tail
                .trim_start_matches(", expected one of ")
                .trim_start_matches(", expected ")
                .replace('`', "");
            // The path already ends in the unknown name when the deserializer tracked it.
            let key = if parent.rsplit('.').next() == Some(name) { parent } else { join(name) };
            return Self::UnknownKey { key, expected };
        }
        if let Some(rest) = message.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or(rest);
            return Self::MissingKey { key: join(name) };
        }
        if let Some(rest) = message.strip_prefix("missing configuration field \"") {
            return Self::MissingKey { key: rest.trim_end_matches('"').to_string() };
        }
        Self::Invalid { key: parent, message }
    }
}
