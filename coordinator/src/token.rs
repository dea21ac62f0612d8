//! Every job has a token. One given (job file, `MTL_JOB_TOKEN`, `--token-file`) is used as is;
//! otherwise the coordinator takes the one it generated earlier for this job, or generates one,
//! in the file [`mtl_job::ServerSection::token_path`] names, readable by its owner only. The
//! log names the file, never the token. Reusing the file is what lets the workers of a
//! restarted coordinator re-attach.
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use mtl_job::{JobConfig, JobToken};

use crate::CoordinatorError;

/// Fills in `cfg.job.token` when none was given, from the job's token file or a new one.
/// [`crate::run`] does it first; `coordinator serve` does it before it writes its address
/// file, so that a script which waits for the address finds the token file too.
pub fn ensure(cfg: &mut JobConfig) -> Result<(), CoordinatorError> {
    if !cfg.job.token.is_empty() {
        return Ok(());
    }
    let path = cfg.server.token_path(&cfg.job.name);
    cfg.job.token = match create(&path)? {
        Some(token) => {
            tracing::info!(path = %path.display(), "no job token was given: generated one into this file (mode 0600); give it to workers with --token-file or MTL_JOB_TOKEN");
            token
        }
        None => {
            let token = JobToken::read_file(&path).map_err(|err| CoordinatorError::TokenFile {
                path: path.clone(),
                message: err.to_string(),
            })?;
            tracing::info!(path = %path.display(), "no job token was given: using the one generated earlier for this job");
            token
        }
    };
    Ok(())
}

/// Writes a new random token into `path`, created with mode 0600; `None` if the file exists.
fn create(path: &Path) -> Result<Option<JobToken>, CoordinatorError> {
    let fail = |err: &dyn std::fmt::Display| CoordinatorError::TokenFile {
        path: path.to_owned(),
        message: err.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|err| fail(&err))?;
    }
    let mut file = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
        Err(err) => return Err(fail(&err)),
    };
    // 256 bits from the operating system's generator, as hex.
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|err| fail(&err))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|err| fail(&err))?;
    Ok(Some(JobToken::new(token)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use mtl_job::{JobConfig, JobToken};

    fn job(dir: &std::path::Path, token: &str) -> JobConfig {
        let mut cfg = JobConfig::from_toml("[job]\nname = \"t\"\n").unwrap();
        cfg.job.token = JobToken::new(token);
        cfg.server.state_db = dir.join("state.db").display().to_string();
        cfg
    }

    #[test]
    fn a_job_without_a_token_gets_one_in_a_private_file_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = job(dir.path(), "");
        super::ensure(&mut first).unwrap();
        let path = dir.path().join("token");
        assert_eq!(first.server.token_path("t"), path);
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written.trim().len(), 64, "256 bits as hex");
        assert!(first.job.token.matches(written.trim()));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        let mut restarted = job(dir.path(), "");
        super::ensure(&mut restarted).unwrap();
        assert_eq!(restarted.job.token, first.job.token, "a restarted coordinator reuses it");

        let other = tempfile::tempdir().unwrap();
        let mut elsewhere = job(other.path(), "");
        super::ensure(&mut elsewhere).unwrap();
        assert_ne!(elsewhere.job.token, first.job.token, "tokens are random");
    }

    #[test]
    fn a_given_token_is_used_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = job(dir.path(), "given");
        super::ensure(&mut cfg).unwrap();
        assert!(cfg.job.token.matches("given"));
        assert!(!dir.path().join("token").exists());
    }

    #[test]
    fn an_empty_token_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "").unwrap();
        let err = super::ensure(&mut job(dir.path(), "")).unwrap_err().to_string();
        assert!(err.contains("token") && err.contains("empty"), "{err}");
    }
}
