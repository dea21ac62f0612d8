//! The job token: the shared secret every RPC carries. It may be read from a job file but is
//! never written back: it serialises as an empty string, so [`crate::JobConfig::to_toml`] (the
//! config sent to workers, a checkpoint's `job.toml`) carries none and [`crate::JobConfig::hash`]
//! is what it was when the token was cleared before hashing; its `Debug` is redacted, and it is
//! compared in constant time.
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;

use crate::JobConfigError;

/// The environment variable binaries read the job token from.
pub const TOKEN_ENV: &str = "MTL_JOB_TOKEN";

/// A job token; empty means none was given (the coordinator then generates one).
#[derive(Clone, Default)]
pub struct JobToken(String);

impl JobToken {
    /// A token from its text.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// Reads a token file: its content without surrounding whitespace (a trailing newline is
    /// usual). An empty file is an error, not "no token".
    pub fn read_file(path: &Path) -> Result<Self, JobConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| JobConfigError::TokenFile { path: path.to_owned(), message: err.to_string() })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(JobConfigError::TokenFile {
                path: path.to_owned(),
                message: "the file is empty".into(),
            });
        }
        Ok(Self(token.to_string()))
    }

    /// The token a binary was given, the first of: a token file (`--token-file`), a token on
    /// the command line (`--token`, which other users see in `ps`), the value of
    /// [`TOKEN_ENV`] (`env`; empty counts as unset). `None` when there is none.
    pub fn given(
        file: Option<&Path>,
        flag: Option<String>,
        env: Option<String>,
    ) -> Result<Option<Self>, JobConfigError> {
        if let Some(path) = file {
            return Self::read_file(path).map(Some);
        }
        Ok(flag.or(env).filter(|t| !t.is_empty()).map(Self))
    }

    /// The token of a client (`worker run`, `coordinator status`): [`JobToken::given`] with
    /// [`TOKEN_ENV`] from the environment. `--token` works, but `warn` is told that other users
    /// see it; no token at all is an error saying how to give one.
    pub fn for_client(
        file: Option<&Path>,
        flag: Option<String>,
        warn: impl FnOnce(&str),
    ) -> Result<Self, String> {
        if flag.is_some() {
            warn("--token is visible to other users of this machine (ps); prefer --token-file or MTL_JOB_TOKEN");
        }
        match Self::given(file, flag, std::env::var(TOKEN_ENV).ok()) {
            Ok(Some(token)) => Ok(token),
            Ok(None) => Err(format!("no job token: set {TOKEN_ENV} or pass --token-file")),
            Err(err) => Err(err.to_string()),
        }
    }

    /// Whether no token was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The secret itself, to put in a request. Nothing that is logged or written may take it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this token, in time independent of where they differ. An empty
    /// token matches nothing.
    pub fn matches(&self, given: &str) -> bool {
        !self.0.is_empty() && bool::from(self.0.as_bytes().ct_eq(given.as_bytes()))
    }
}

impl PartialEq for JobToken {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.as_bytes().ct_eq(other.0.as_bytes()))
    }
}

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "JobToken(none)" } else { "JobToken(<redacted>)" })
    }
}

impl Serialize for JobToken {
    /// Always `""`: a serialised config never holds the secret.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("")
    }
}

impl<'de> Deserialize<'de> for JobToken {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::JobToken;

    #[test]
    fn matches_only_the_same_nonempty_token() {
        let token = JobToken::new("s3cret");
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3creT"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches(""));
        assert!(!JobToken::default().matches(""), "no token accepts nothing");
    }

    #[test]
    fn is_never_shown() {
        let token = JobToken::new("s3cret");
        assert_eq!(format!("{token:?}"), "JobToken(<redacted>)");
        assert_eq!(
            toml::to_string(&[("token", &token)].into_iter().collect::<std::collections::BTreeMap<_, _>>())
                .unwrap(),
            "token = \"\"\n"
        );
    }

    #[test]
    fn a_file_comes_first_then_the_flag_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\n").unwrap();
        let given = |file: Option<&std::path::Path>, flag: Option<&str>, env: Option<&str>| {
            JobToken::given(file, flag.map(Into::into), env.map(Into::into)).unwrap().map(|t| t.0)
        };
        assert_eq!(given(Some(&path), Some("flag"), Some("env")).as_deref(), Some("from-file"));
        assert_eq!(given(None, Some("flag"), Some("env")).as_deref(), Some("flag"));
        assert_eq!(given(None, None, Some("env")).as_deref(), Some("env"));
        assert_eq!(given(None, None, Some("")), None);
        assert_eq!(given(None, None, None), None);
    }

    #[test]
    fn a_file_is_read_without_its_newline_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\n").unwrap();
        assert_eq!(JobToken::read_file(&path).unwrap().expose(), "abc");
        std::fs::write(&path, "\n").unwrap();
        let err = JobToken::read_file(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("empty"), "{err}");
        let err = JobToken::read_file(&dir.path().join("absent")).unwrap_err().to_string();
        assert!(err.contains("absent"), "{err}");
    }
}
