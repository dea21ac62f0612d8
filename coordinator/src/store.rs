//! The job's durable state in SQLite (`server.state_db`): what a restarted coordinator needs to
//! go on with the job. Every change is written when it happens, one transaction each, so a
//! coordinator killed at any point reopens a consistent database.
//!
//! Tables: `meta` (job name, config hash, outcome), `generations` and `members` (who trained in
//! which generation, and why each generation began and ended), `events` (the generation log
//! shown in status), `epoch_segments` (sample accounting), `checkpoints` and
//! `checkpoint_metrics`, `metric_points` and `metric_values` (the metrics history). Scalars
//! live one per row so NaN and infinity survive (SQLite reads a NaN back as NULL, taken as NaN).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_proto::v1::{JobEvent, MetricPoint, MetricsKind};
use rusqlite::{params, Connection, OptionalExtension};

use crate::accounting::Segment;
use crate::checkpoints::Checkpoint;
use crate::state::WorkerInfo;
use crate::CoordinatorError;

/// Bumped when the tables change incompatibly; an older database is then refused by name.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY, formed_at_ms INTEGER NOT NULL, cause TEXT NOT NULL,
    ended_at_ms INTEGER, end_cause TEXT, resume_step INTEGER);
CREATE TABLE IF NOT EXISTS members (
    generation INTEGER NOT NULL, rank INTEGER NOT NULL, worker_id TEXT NOT NULL, host TEXT NOT NULL,
    device TEXT NOT NULL, peer_addr TEXT NOT NULL, nccl_unique_id BLOB NOT NULL,
    PRIMARY KEY (generation, rank));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, generation INTEGER NOT NULL,
    kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS epoch_segments (
    epoch INTEGER NOT NULL, generation INTEGER NOT NULL, world_size INTEGER NOT NULL,
    batch_size INTEGER NOT NULL, samples INTEGER NOT NULL, start INTEGER NOT NULL,
    steps_at_start INTEGER NOT NULL, end_pos INTEGER NOT NULL, kept_end INTEGER NOT NULL,
    planned_end INTEGER NOT NULL, PRIMARY KEY (epoch, generation));
CREATE TABLE IF NOT EXISTS checkpoints (
    step INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, epoch_position INTEGER NOT NULL,
    generation INTEGER NOT NULL, path TEXT NOT NULL, resolved TEXT NOT NULL,
    committed_at_ms INTEGER NOT NULL, pruned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS checkpoint_metrics (
    step INTEGER NOT NULL, key TEXT NOT NULL, value REAL, PRIMARY KEY (step, key));
CREATE TABLE IF NOT EXISTS metric_points (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL, generation INTEGER NOT NULL,
    epoch INTEGER NOT NULL, step INTEGER NOT NULL, rank INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS metric_values (
    point INTEGER NOT NULL, key TEXT NOT NULL, value REAL, PRIMARY KEY (point, key));
";

/// A generation as stored: its members in rank order and how it ended, if it did.
#[derive(Debug, Clone)]
pub(crate) struct StoredGeneration {
    pub(crate) id: u64,
    pub(crate) members: Vec<WorkerInfo>,
    pub(crate) end_cause: Option<String>,
    /// The step of the checkpoint it resumed from.
    pub(crate) resume_step: Option<u64>,
}

/// How the job ended, when it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoredOutcome {
    Finished,
    Failed(String),
    /// Stopped on request; resumes from the newest committed checkpoint.
    Interrupted(String),
}

/// Everything a restarted coordinator reloads.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    pub(crate) outcome: Option<StoredOutcome>,
    /// Oldest first.
    pub(crate) generations: Vec<StoredGeneration>,
    pub(crate) events: Vec<JobEvent>,
    pub(crate) segments: Vec<Segment>,
    /// By step.
    pub(crate) checkpoints: Vec<Checkpoint>,
    pub(crate) history: Vec<MetricPoint>,
}

/// An open state database.
pub(crate) struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Milliseconds since the Unix epoch, for records meant for people.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn real(value: Option<f64>) -> f64 {
    value.unwrap_or(f64::NAN)
}

impl Store {
    /// Opens (creating) the database at `path`. Returns what it held when it belongs to this
    /// job, `None` when it is new, and an error naming the file when it belongs to another job
    /// (another name or config hash) or cannot be used.
    pub(crate) fn open(
        path: &Path,
        job_name: &str,
        config_hash: &str,
    ) -> Result<(Self, Option<Restored>), CoordinatorError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| CoordinatorError::Io { path: dir.to_owned(), source })?;
        }
        let conn = Connection::open(path).map_err(|e| store_error(path, "open", e))?;
        let store = Self { conn, path: path.to_owned() };
        // WAL + synchronous NORMAL: a killed coordinator loses no committed transaction (the log
        // is in the OS's cache); only a crash of the machine can lose the last ones.
        store
            .conn
            .execute_batch(
                // The busy timeout first: switching to WAL takes a lock that a coordinator
                // still shutting down (or a reader) may hold for a moment.
                "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
            )
            .map_err(|e| store.error("set up", e))?;
        store.conn.execute_batch(SCHEMA).map_err(|e| store.error("create tables", e))?;
        let meta = |key: &str| -> Result<Option<String>, CoordinatorError> {
            store
                .conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(|e| store.error("read meta", e))
        };
        match (meta("job_name")?, meta("config_hash")?, meta("schema_version")?) {
            (Some(name), Some(hash), Some(version)) => {
                if version != SCHEMA_VERSION.to_string() {
                    return Err(CoordinatorError::StoreMismatch {
                        path: path.to_owned(),
                        message: format!("schema version {version}, this coordinator reads {SCHEMA_VERSION}"),
                    });
                }
                if name != job_name || hash != config_hash {
                    return Err(CoordinatorError::StoreMismatch {
                        path: path.to_owned(),
                        message: format!(
                            "it holds job `{name}` with config hash {hash}, this config is job `{job_name}` \
                             with hash {config_hash}; restart with the job's config, or set server.state_db \
                             to start a new job"
                        ),
                    });
                }
                let restored = store.load()?;
                Ok((store, Some(restored)))
            }
            _ => {
                let tx_meta = [
                    ("job_name", job_name.to_string()),
                    ("config_hash", config_hash.to_string()),
                    ("schema_version", SCHEMA_VERSION.to_string()),
                ];
                for (k, v) in tx_meta {
                    store
                        .conn
                        .execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)", params![k, v])
                        .map_err(|e| store.error("write meta", e))?;
                }
                Ok((store, None))
            }
        }
    }

    fn error(&self, what: &str, err: rusqlite::Error) -> CoordinatorError {
        store_error(&self.path, what, err)
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self) -> Result<Restored, CoordinatorError> {
        let e = |what: &'static str| move |err| self.error(what, err);
        let mut restored = Restored::default();
        let outcome: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'outcome'", [], |r| r.get(0))
            .optional()
            .map_err(e("read outcome"))?;
        let message: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'outcome_message'", [], |r| r.get(0))
            .optional()
            .map_err(e("read outcome"))?;
        restored.outcome = match outcome.as_deref() {
            Some("finished") => Some(StoredOutcome::Finished),
            Some("failed") => Some(StoredOutcome::Failed(message.unwrap_or_default())),
            Some("interrupted") => Some(StoredOutcome::Interrupted(message.unwrap_or_default())),
            _ => None,
        };

        let mut stmt = self
            .conn
            .prepare("SELECT id, end_cause, resume_step FROM generations ORDER BY id")
            .map_err(e("read generations"))?;
        let generations = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, Option<i64>>(2)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(e("read generations"))?;
        let mut members = self
            .conn
            .prepare(
                "SELECT worker_id, host, device, peer_addr, nccl_unique_id FROM members \
                 WHERE generation = ?1 ORDER BY rank",
            )
            .map_err(e("read members"))?;
        for (id, end_cause, resume_step) in generations {
            let infos = members
                .query_map([id], |r| {
                    Ok(WorkerInfo {
                        worker_id: r.get(0)?,
                        host: r.get(1)?,
                        device: r.get(2)?,
                        peer_addr: r.get(3)?,
                        nccl_unique_id: r.get(4)?,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(e("read members"))?;
            restored.generations.push(StoredGeneration {
                id: id as u64,
                members: infos,
                end_cause,
                resume_step: resume_step.map(|s| s as u64),
            });
        }

        let mut stmt = self
            .conn
            .prepare("SELECT at_ms, generation, kind, detail FROM events ORDER BY id")
            .map_err(e("read events"))?;
        restored.events = stmt
            .query_map([], |r| {
                Ok(JobEvent {
                    at_unix_ms: r.get::<_, i64>(0)? as u64,
                    generation: r.get::<_, i64>(1)? as u64,
                    kind: r.get(2)?,
                    detail: r.get(3)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(e("read events"))?;

        let mut stmt = self
            .conn
            .prepare(
                "SELECT epoch, generation, world_size, batch_size, samples, start, steps_at_start, end_pos, \
                 kept_end, planned_end FROM epoch_segments ORDER BY epoch, start, generation",
            )
            .map_err(e("read epoch segments"))?;
        restored.segments = stmt
            .query_map([], |r| {
                Ok(Segment {
                    epoch: r.get::<_, i64>(0)? as u64,
                    generation: r.get::<_, i64>(1)? as u64,
                    world_size: r.get::<_, i64>(2)? as u32,
                    batch_size: r.get::<_, i64>(3)? as u32,
                    samples: r.get::<_, i64>(4)? as u64,
                    start: r.get::<_, i64>(5)? as u64,
                    steps_at_start: r.get::<_, i64>(6)? as u64,
                    end: r.get::<_, i64>(7)? as u64,
                    kept_end: r.get::<_, i64>(8)? as u64,
                    planned_end: r.get::<_, i64>(9)? as u64,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(e("read epoch segments"))?;

        let mut stmt = self
            .conn
            .prepare(
                "SELECT step, epoch, epoch_position, generation, path, resolved, pruned FROM checkpoints ORDER BY step",
            )
            .map_err(e("read checkpoints"))?;
        let mut checkpoints = stmt
            .query_map([], |r| {
                Ok(Checkpoint {
                    step: r.get::<_, i64>(0)? as u64,
                    epoch: r.get::<_, i64>(1)? as u64,
                    epoch_position: r.get::<_, i64>(2)? as u64,
                    generation: r.get::<_, i64>(3)? as u64,
                    path: r.get(4)?,
                    resolved: PathBuf::from(r.get::<_, String>(5)?),
                    pruned: r.get::<_, i64>(6)? != 0,
                    metrics: BTreeMap::new(),
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(e("read checkpoints"))?;
        let mut stmt = self
            .conn
            .prepare("SELECT step, key, value FROM checkpoint_metrics")
            .map_err(e("read checkpoint metrics"))?;
        let values = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?, real(r.get(2)?))))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(e("read checkpoint metrics"))?;
        for (step, key, value) in values {
            if let Some(c) = checkpoints.iter_mut().find(|c| c.step == step) {
                c.metrics.insert(key, value);
            }
        }
        restored.checkpoints = checkpoints;

        let mut stmt = self
            .conn
            .prepare("SELECT id, kind, generation, epoch, step, rank FROM metric_points ORDER BY id")
            .map_err(e("read metrics"))?;
        let points = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    MetricPoint {
                        kind: r.get(1)?,
                        generation: r.get::<_, i64>(2)? as u64,
                        epoch: r.get::<_, i64>(3)? as u64,
                        step: r.get::<_, i64>(4)? as u64,
                        rank: r.get::<_, i64>(5)? as u32,
                        values: Default::default(),
                    },
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(e("read metrics"))?;
        let mut stmt =
            self.conn.prepare("SELECT point, key, value FROM metric_values").map_err(e("read metrics"))?;
        let mut values: BTreeMap<i64, Vec<(String, f64)>> = BTreeMap::new();
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, real(r.get(2)?))))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(e("read metrics"))?;
        for (point, key, value) in rows {
            values.entry(point).or_default().push((key, value));
        }
        restored.history = points
            .into_iter()
            .map(|(id, mut p)| {
                p.values = values.remove(&id).unwrap_or_default().into_iter().collect();
                p
            })
            .collect();
        Ok(restored)
    }

    /// Records a new generation, its members in rank order and why it formed.
    pub(crate) fn insert_generation(
        &mut self,
        id: u64,
        members: &[WorkerInfo],
        event: &JobEvent,
        resume_step: Option<u64>,
    ) -> Result<(), CoordinatorError> {
        let tx = self.conn.transaction().map_err(|e| store_error(&self.path, "begin", e))?;
        let write = || -> rusqlite::Result<()> {
            tx.execute(
                "INSERT INTO generations (id, formed_at_ms, cause, resume_step) VALUES (?1, ?2, ?3, ?4)",
                params![id as i64, event.at_unix_ms as i64, event.detail, resume_step.map(|s| s as i64)],
            )?;
            for (rank, m) in members.iter().enumerate() {
                tx.execute(
                    "INSERT INTO members (generation, rank, worker_id, host, device, peer_addr, nccl_unique_id) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![id as i64, rank as i64, m.worker_id, m.host, m.device, m.peer_addr, m.nccl_unique_id],
                )?;
            }
            insert_event(&tx, event)?;
            Ok(())
        };
        write().and_then(|()| tx.commit()).map_err(|e| store_error(&self.path, "record a generation", e))
    }

    /// Records that a generation ended and why.
    pub(crate) fn end_generation(&mut self, event: &JobEvent) -> Result<(), CoordinatorError> {
        let tx = self.conn.transaction().map_err(|e| store_error(&self.path, "begin", e))?;
        let write = || -> rusqlite::Result<()> {
            tx.execute(
                "UPDATE generations SET ended_at_ms = ?2, end_cause = ?3 WHERE id = ?1 AND end_cause IS NULL",
                params![event.generation as i64, event.at_unix_ms as i64, event.detail],
            )?;
            insert_event(&tx, event)
        };
        write()
            .and_then(|()| tx.commit())
            .map_err(|e| store_error(&self.path, "record a generation's end", e))
    }

    /// Appends to the event log.
    pub(crate) fn insert_event(&mut self, event: &JobEvent) -> Result<(), CoordinatorError> {
        insert_event(&self.conn, event).map_err(|e| self.error("record an event", e))
    }

    /// Records how the job ended (or clears it when a failed job goes on).
    pub(crate) fn set_outcome(&mut self, outcome: Option<&StoredOutcome>) -> Result<(), CoordinatorError> {
        let (name, message) = match outcome {
            None => {
                return self
                    .conn
                    .execute("DELETE FROM meta WHERE key IN ('outcome', 'outcome_message')", [])
                    .map(drop)
                    .map_err(|e| self.error("clear the outcome", e));
            }
            Some(StoredOutcome::Finished) => ("finished", String::new()),
            Some(StoredOutcome::Failed(m)) => ("failed", m.clone()),
            Some(StoredOutcome::Interrupted(m)) => ("interrupted", m.clone()),
        };
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('outcome', ?1), ('outcome_message', ?2)",
                params![name, message],
            )
            .map(drop)
            .map_err(|e| self.error("record the outcome", e))
    }

    /// Writes a segment's current extent (insert or update).
    pub(crate) fn put_segment(&mut self, s: &Segment) -> Result<(), CoordinatorError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO epoch_segments (epoch, generation, world_size, batch_size, samples, start, \
                 steps_at_start, end_pos, kept_end, planned_end) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    s.epoch as i64,
                    s.generation as i64,
                    s.world_size,
                    s.batch_size,
                    s.samples as i64,
                    s.start as i64,
                    s.steps_at_start as i64,
                    s.end as i64,
                    s.kept_end as i64,
                    s.planned_end as i64
                ],
            )
            .map(drop)
            .map_err(|e| self.error("record epoch accounting", e))
    }

    /// Records a committed checkpoint with its metrics.
    pub(crate) fn insert_checkpoint(&mut self, c: &Checkpoint) -> Result<(), CoordinatorError> {
        let tx = self.conn.transaction().map_err(|e| store_error(&self.path, "begin", e))?;
        let write = || -> rusqlite::Result<()> {
            // A step committed again (a later generation that resumed from an older checkpoint
            // wrote it anew) replaces the earlier record, metrics included.
            tx.execute("DELETE FROM checkpoint_metrics WHERE step = ?1", params![c.step as i64])?;
            tx.execute(
                "INSERT OR REPLACE INTO checkpoints (step, epoch, epoch_position, generation, path, resolved, committed_at_ms, pruned) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)",
                params![
                    c.step as i64,
                    c.epoch as i64,
                    c.epoch_position as i64,
                    c.generation as i64,
                    c.path,
                    c.resolved.display().to_string(),
                    unix_ms() as i64
                ],
            )?;
            put_checkpoint_metrics(&tx, c.step, &c.metrics)
        };
        write().and_then(|()| tx.commit()).map_err(|e| store_error(&self.path, "record a checkpoint", e))
    }

    /// Adds metrics to a checkpoint's record (an evaluation of its step that arrived later).
    pub(crate) fn add_checkpoint_metrics(
        &mut self,
        step: u64,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<(), CoordinatorError> {
        put_checkpoint_metrics(&self.conn, step, metrics)
            .map_err(|e| self.error("record checkpoint metrics", e))
    }

    /// Marks a checkpoint's directory as deleted.
    pub(crate) fn mark_pruned(&mut self, step: u64) -> Result<(), CoordinatorError> {
        self.conn
            .execute("UPDATE checkpoints SET pruned = 1 WHERE step = ?1", [step as i64])
            .map(drop)
            .map_err(|e| self.error("record a pruned checkpoint", e))
    }

    /// Appends a point to the metrics history.
    pub(crate) fn insert_metric(&mut self, p: &MetricPoint) -> Result<(), CoordinatorError> {
        let tx = self.conn.transaction().map_err(|e| store_error(&self.path, "begin", e))?;
        let write = || -> rusqlite::Result<()> {
            let kind = MetricsKind::try_from(p.kind).unwrap_or(MetricsKind::Unspecified) as i32;
            tx.execute(
                "INSERT INTO metric_points (kind, generation, epoch, step, rank) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![kind, p.generation as i64, p.epoch as i64, p.step as i64, p.rank],
            )?;
            let id = tx.last_insert_rowid();
            let mut stmt =
                tx.prepare_cached("INSERT INTO metric_values (point, key, value) VALUES (?1, ?2, ?3)")?;
            for (key, value) in &p.values {
                stmt.execute(params![id, key, value])?;
            }
            Ok(())
        };
        write().and_then(|()| tx.commit()).map_err(|e| store_error(&self.path, "record a metrics point", e))
    }
}

fn insert_event(conn: &Connection, event: &JobEvent) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO events (at_ms, generation, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        params![event.at_unix_ms as i64, event.generation as i64, event.kind, event.detail],
    )
    .map(drop)
}

fn put_checkpoint_metrics(
    conn: &Connection,
    step: u64,
    metrics: &BTreeMap<String, f64>,
) -> rusqlite::Result<()> {
    let mut stmt = conn
        .prepare_cached("INSERT OR REPLACE INTO checkpoint_metrics (step, key, value) VALUES (?1, ?2, ?3)")?;
    for (key, value) in metrics {
        stmt.execute(params![step as i64, key, value])?;
    }
    Ok(())
}

fn store_error(path: &Path, what: &str, err: rusqlite::Error) -> CoordinatorError {
    CoordinatorError::Store { path: path.to_owned(), message: format!("cannot {what}: {err}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            host: "h".into(),
            device: "cpu".into(),
            peer_addr: format!("{id}:1"),
            nccl_unique_id: vec![1, 2, 3],
        }
    }

    #[test]
    fn a_reopened_store_returns_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        let (mut store, restored) = Store::open(&path, "job", "abc").unwrap();
        assert!(restored.is_none(), "a new database holds no job");
        let formed =
            JobEvent { at_unix_ms: 5, generation: 1, kind: "formed".into(), detail: "2 workers".into() };
        store.insert_generation(1, &[info("a"), info("b")], &formed, None).unwrap();
        let point = MetricPoint {
            kind: MetricsKind::Train as i32,
            step: 3,
            epoch: 0,
            values: [("loss".to_string(), f64::NAN), ("lr".to_string(), 0.5)].into_iter().collect(),
            rank: 0,
            generation: 1,
        };
        store.insert_metric(&point).unwrap();
        let segment = Segment {
            epoch: 0,
            generation: 1,
            world_size: 2,
            batch_size: 4,
            samples: 100,
            start: 0,
            steps_at_start: 0,
            end: 24,
            kept_end: 24,
            planned_end: 96,
        };
        store.put_segment(&segment).unwrap();
        let checkpoint = Checkpoint {
            step: 3,
            epoch: 0,
            epoch_position: 24,
            generation: 1,
            path: "step-3".into(),
            resolved: dir.path().join("step-3"),
            metrics: [("detection.AP50".to_string(), 0.25)].into_iter().collect(),
            pruned: false,
        };
        store.insert_checkpoint(&checkpoint).unwrap();
        store.mark_pruned(3).unwrap();
        // Step 3 written again by a later generation (resumed from an older checkpoint).
        let again =
            Checkpoint { generation: 2, metrics: BTreeMap::new(), pruned: false, ..checkpoint.clone() };
        store.insert_checkpoint(&again).unwrap();
        drop(store);

        let (_, restored) = Store::open(&path, "job", "abc").unwrap();
        let r = restored.expect("the job's state");
        assert_eq!(r.generations.len(), 1);
        let g = &r.generations[0];
        assert_eq!(g.members.iter().map(|m| m.worker_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!((g.members[1].peer_addr.as_str(), g.end_cause.as_ref()), ("b:1", None));
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].detail, "2 workers");
        assert_eq!(r.segments, [segment]);
        assert_eq!(r.checkpoints.len(), 1, "a step is recorded once");
        assert_eq!(
            (r.checkpoints[0].generation, r.checkpoints[0].pruned),
            (2, false),
            "the newest commit wins"
        );
        assert!(r.checkpoints[0].metrics.is_empty(), "with its own metrics");
        assert_eq!(r.history.len(), 1);
        assert!(r.history[0].values["loss"].is_nan(), "NaN survives");
        assert_eq!(r.history[0].values["lr"], 0.5);
        assert_eq!(r.outcome, None);
    }

    #[test]
    fn a_store_of_another_job_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        Store::open(&path, "job", "abc").unwrap();
        let err = Store::open(&path, "job", "def").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains("abc") && text.contains("def"),
            "{text}"
        );
    }
}
