//! A checkpoint directory on disk: written whole or not at all, and checked file by file.
//!
//! Writing: every file into a temporary sibling directory (`.<name>.tmp-<pid>`), each fsynced,
//! `manifest.json` (size and SHA-256 of every other file) last, the directory fsynced, one
//! rename onto the final name, the parent fsynced. A crash at any point leaves either no
//! `<name>/` or a complete one; a failed write removes its temporary directory and leaves
//! everything else as it was.
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::WorkerError;

/// The file listing every other file of a checkpoint with its checksum.
pub(super) const MANIFEST: &str = "manifest.json";
/// The manifest's `format`; a checkpoint of another format is not read.
const FORMAT: u32 = 1;
/// Checkpoints in a checkpoint directory are `step-<N>/`.
const STEP_PREFIX: &str = "step-";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: u32,
    files: BTreeMap<String, FileEntry>,
}

/// One file of a checkpoint as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

impl FileEntry {
    fn of(bytes: &[u8]) -> Self {
        let sha256 = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        Self { bytes: bytes.len() as u64, sha256 }
    }
}

/// The name of the checkpoint after `step` optimizer steps.
pub(super) fn step_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step}")
}

/// The step of a `step-<N>` directory name.
pub(super) fn parse_step_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |source| WorkerError::CheckpointWrite { path: path.to_owned(), source }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), WorkerError> {
    let mut file = fs::File::create(path).map_err(write_error(path))?;
    file.write_all(bytes).map_err(write_error(path))?;
    file.sync_all().map_err(write_error(path))
}

fn sync_dir(dir: &Path) -> Result<(), WorkerError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(write_error(dir))
}

/// Writes `files` as the directory `target` (replacing one there) and returns the manifest's
/// entries.
pub(super) fn write_dir(
    target: &Path,
    files: &[(&str, Vec<u8>)],
) -> Result<BTreeMap<String, FileEntry>, WorkerError> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = target.file_name().map_or_else(|| "checkpoint".into(), |n| n.to_string_lossy().into_owned());
    fs::create_dir_all(parent).map_err(write_error(parent))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(write_error(&tmp))?;
    }
    let entries = write_files(&tmp, files).inspect_err(|_| {
        let _ = fs::remove_dir_all(&tmp);
    })?;
    // Only a complete directory replaces the old one. Renaming onto a non-empty directory is
    // not possible, so an old one (rewritten step, `--out`) is moved aside first.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if target.exists() {
        fs::rename(target, &old).map_err(write_error(target)).inspect_err(|_| {
            let _ = fs::remove_dir_all(&tmp);
        })?;
    }
    if let Err(source) = fs::rename(&tmp, target) {
        let _ = fs::rename(&old, target);
        let _ = fs::remove_dir_all(&tmp);
        return Err(WorkerError::CheckpointWrite { path: target.to_owned(), source });
    }
    sync_dir(parent)?;
    if old.exists() {
        if let Err(err) = fs::remove_dir_all(&old) {
            tracing::warn!(path = %old.display(), %err, "could not remove the replaced checkpoint");
        }
    }
    Ok(entries)
}

fn write_files(tmp: &Path, files: &[(&str, Vec<u8>)]) -> Result<BTreeMap<String, FileEntry>, WorkerError> {
    fs::create_dir(tmp).map_err(write_error(tmp))?;
    let mut entries = BTreeMap::new();
    for (name, bytes) in files {
        write_file(&tmp.join(name), bytes)?;
        entries.insert((*name).to_string(), FileEntry::of(bytes));
    }
    let manifest = Manifest { format: FORMAT, files: entries.clone() };
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    write_file(&tmp.join(MANIFEST), &text)?;
    sync_dir(tmp)?;
    Ok(entries)
}

/// Writes `bytes` as the file `target` the same way: temporary sibling, fsync, rename.
pub(super) fn write_file_atomic(target: &Path, bytes: &[u8]) -> Result<(), WorkerError> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = target.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    fs::create_dir_all(parent).map_err(write_error(parent))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    write_file(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, target).map_err(write_error(target)))
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
    sync_dir(parent)
}

/// Every file the manifest of `dir` lists, read and checked against its size and SHA-256;
/// `Err` says why the checkpoint cannot be used.
pub(super) fn read_verified(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let text =
        fs::read(dir.join(MANIFEST)).map_err(|e| format!("{MANIFEST}: {e} (an incomplete checkpoint)"))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| format!("{MANIFEST}: {e}"))?;
    if manifest.format != FORMAT {
        return Err(format!("{MANIFEST}: format {}, this worker reads format {FORMAT}", manifest.format));
    }
    let mut files = BTreeMap::new();
    for (name, entry) in manifest.files {
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(format!("{MANIFEST}: `{name}` is not a file name"));
        }
        let bytes = fs::read(dir.join(&name)).map_err(|e| format!("{name}: {e}"))?;
        let found = FileEntry::of(&bytes);
        if found.bytes != entry.bytes {
            return Err(format!("{name}: {} bytes, the manifest says {}", found.bytes, entry.bytes));
        }
        if found.sha256 != entry.sha256 {
            return Err(format!("{name}: sha256 {}, the manifest says {}", found.sha256, entry.sha256));
        }
        files.insert(name, bytes);
    }
    Ok(files)
}

/// The `step-<N>/` directories in `dir` (complete or not), oldest first; none when `dir` does
/// not exist.
pub(super) fn list_steps(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WorkerError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(WorkerError::Io { path: dir.to_owned(), source }),
    };
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| WorkerError::Io { path: dir.to_owned(), source })?;
        let Some(step) = entry.file_name().to_str().and_then(parse_step_name) else { continue };
        if entry.path().is_dir() {
            steps.push((step, entry.path()));
        }
    }
    steps.sort();
    Ok(steps)
}

/// Temporary and replaced directories that interrupted writes left in `dir`.
pub(super) fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&format!(".{STEP_PREFIX}")) && (name.contains(".tmp-") || name.contains(".old-"))
        })
        .map(|e| e.path())
        .collect()
}
