//! Generating the synthetic dataset once when several processes open it at the same time (the
//! workers of one machine do): one writer at a time holds an exclusive lock on `<dir>.lock`,
//! generates into `<dir>.partial` and renames it to `<dir>`, so `<dir>` is either absent or
//! complete. The others wait for the lock and then find the dataset there. The kernel drops a
//! crashed writer's lock; the next writer removes its `<dir>.partial` and starts over.
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{generate, io, SyntheticConfig};
use crate::WorkerError;

/// Does `dir` hold a complete dataset? `generate` writes `dataset.json` last.
fn is_complete(dir: &Path) -> bool {
    dir.join("dataset.json").is_file() && dir.join("train.jsonl").is_file()
}

/// `<dir><suffix>`: a sibling of `dir`, on the same file system so renames are atomic.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Generates the dataset into `dir` unless it is already complete there. Waits at most `wait`
/// for another process generating it; never takes a half-written directory as complete.
pub(crate) fn ensure(dir: &Path, cfg: &SyntheticConfig, wait: Duration) -> Result<(), WorkerError> {
    // `data/shapes/` and `data/shapes` are one directory; its siblings must be outside it.
    let dir = dir.components().as_path();
    if is_complete(dir) {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let Some(_lock) = WriterLock::acquire(&sibling(dir, ".lock"), dir, wait)? else {
        // Another writer finished while this process waited.
        return Ok(());
    };
    if is_complete(dir) {
        return Ok(());
    }
    if dir.exists() {
        let empty = std::fs::read_dir(dir).map_err(io(dir))?.next().is_none();
        if !empty {
            return Err(WorkerError::Io {
                path: dir.to_owned(),
                source: std::io::Error::other(
                    "exists but holds no complete synthetic dataset (no dataset.json, which the \
                     generator writes last): remove it or point data.train elsewhere",
                ),
            });
        }
        std::fs::remove_dir(dir).map_err(io(dir))?;
    }
    let partial = sibling(dir, ".partial");
    if partial.exists() {
        tracing::warn!(dir = %partial.display(), "removing the leftovers of an interrupted generation");
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    tracing::info!(dir = %dir.display(), n = cfg.n, size = cfg.size, preset = ?cfg.preset, "generating the synthetic dataset");
    generate(&partial, cfg)?;
    std::fs::rename(&partial, dir).map_err(io(dir))?;
    Ok(())
}

/// The exclusive right to generate into one directory: an `flock` on the lock file, which is
/// removed (while still locked) when the writer is done.
struct WriterLock {
    /// Held open (and so locked) until the writer is dropped.
    _file: File,
    path: PathBuf,
}

impl WriterLock {
    /// Waits up to `wait` for the lock at `path`. `None` when `dir` became complete meanwhile.
    fn acquire(path: &Path, dir: &Path, wait: Duration) -> Result<Option<Self>, WorkerError> {
        let deadline = Instant::now() + wait;
        loop {
            let file =
                OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io(path))?;
            let Some(file) =
                lock_within(file, deadline.saturating_duration_since(Instant::now())).map_err(io(path))?
            else {
                return Err(WorkerError::Io {
                    path: dir.to_owned(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "another process has been generating this synthetic dataset for more \
                             than {} s (it holds {})",
                            wait.as_secs_f64(),
                            path.display()
                        ),
                    ),
                });
            };
            // A holder removes the lock file before unlocking it: if this file was removed, its
            // lock excludes nobody and the dataset is most likely complete; else open it anew.
            if is_same_file(&file, path) {
                return Ok(Some(Self { _file: file, path: path.to_owned() }));
            }
            if is_complete(dir) {
                return Ok(None);
            }
        }
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        // Removed while locked, so no other process can lock this file and take it as the lock;
        // the lock itself goes when `file` closes.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Locks `file` exclusively, waiting at most `wait`; `None` on time-out.
fn lock_within(file: File, wait: Duration) -> std::io::Result<Option<File>> {
    match file.try_lock() {
        Ok(()) => return Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    // A blocking lock on a helper thread wakes as soon as the holder is done. After a time-out
    // the thread keeps waiting; when it gets the lock, its send fails and the file (with the
    // lock) is dropped at once.
    let (locked_tx, locked_rx) = mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = locked_tx.send(file.lock().map(|()| file));
    });
    match locked_rx.recv_timeout(wait) {
        Ok(locked) => locked.map(Some),
        Err(_) => Ok(None),
    }
}

/// Is `path` (still) the file `file` has open?
fn is_same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}
