//! TensorBoard event files of the job, so that a run can be watched as curves: every training
//! report (per-task losses and weights, learning rate, images/s, gradient norms) and every
//! merged evaluation metric as scalars at its training step, and the job's events (generations
//! formed and ended, re-attachments) as text, with the generation and world size as scalars.
//!
//! Watching must never cost the job: events go through a bounded queue to a thread that
//! writes and flushes them (so a live TensorBoard sees them within moments), nothing waits on
//! it, and an I/O error is logged once and turns the writer off; training goes on. Each
//! coordinator start opens a new file, `events.out.tfevents.<secs>.<host>` (TensorBoard reads
//! every file of the directory as one run). `record` is the format.
mod record;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use mtl_proto::v1::{JobEvent, MetricPoint, MetricsKind};
use prost::Message;

use record::{Event, Kind, PluginData, Summary, SummaryMetadata, TensorProto, Value, What};

/// Events waiting for the writer thread at most; past that they are dropped (and the drop is
/// logged once), so a stalled disk never holds up a request.
const QUEUE_EVENTS: usize = 4096;

/// The tag of the job's events (text).
pub(crate) const EVENTS_TAG: &str = "job/events";

/// The TensorBoard tag of a metrics value: a training scalar keeps the worker's name
/// (`loss/cls`, `weight/cls`, `lr`, `images_per_s`); an evaluation metric goes under
/// `eval/<task>/` (`eval/detection/AP50`).
pub(crate) fn tag(kind: MetricsKind, key: &str) -> String {
    match (kind, mtl_metrics::task_of(key)) {
        (MetricsKind::Eval, Some(task)) => format!("eval/{task}/{key}"),
        (MetricsKind::Eval, None) => format!("eval/{key}"),
        _ => key.to_string(),
    }
}

/// The writer of one job's event files; off when the job asked for none or writing failed.
#[derive(Debug)]
pub(crate) struct TensorBoard {
    events_tx: Option<SyncSender<Event>>,
    thread: Option<JoinHandle<()>>,
    /// Whether a full queue has been logged already.
    dropped_logged: bool,
}

impl TensorBoard {
    /// A writer into a new event file in `dir`, or one that writes nothing when `dir` is
    /// `None` or the file cannot be created (logged, never an error).
    pub(crate) fn open(dir: Option<&Path>) -> Self {
        let Some(dir) = dir else { return Self::off() };
        match create_file(dir) {
            Ok((file, path)) => {
                tracing::info!(path = %path.display(), "writing TensorBoard events (tensorboard --logdir {})", dir.display());
                Self::writing(file, path)
            }
            Err((path, err)) => {
                tracing::error!(path = %path.display(), %err, "cannot create the TensorBoard event file; the job runs without one");
                Self::off()
            }
        }
    }

    fn off() -> Self {
        Self { events_tx: None, thread: None, dropped_logged: false }
    }

    /// A writer into `file` (already created at `path`).
    fn writing(file: std::fs::File, path: PathBuf) -> Self {
        let (events_tx, events_rx) = sync_channel(QUEUE_EVENTS);
        let thread = std::thread::Builder::new()
            .name("tensorboard".into())
            .spawn(move || write_events(file, &path, events_rx))
            .map_err(
                |err| tracing::error!(%err, "cannot start the TensorBoard writer; the job runs without it"),
            )
            .ok();
        let mut writer =
            Self { events_tx: thread.as_ref().map(|_| events_tx), thread, dropped_logged: false };
        writer.send(0, What::FileVersion(record::FILE_VERSION.into()));
        writer
    }

    /// Whether events are still being written.
    #[cfg(test)]
    pub(crate) fn is_on(&self) -> bool {
        self.events_tx.is_some()
    }

    /// A training report or merged evaluation: each value as a scalar at its step.
    pub(crate) fn point(&mut self, point: &MetricPoint) {
        let kind = MetricsKind::try_from(point.kind).unwrap_or(MetricsKind::Unspecified);
        let mut values: Vec<(&String, &f64)> = point.values.iter().collect();
        values.sort_by(|a, b| a.0.cmp(b.0));
        let values = values.into_iter().map(|(k, v)| scalar(tag(kind, k), *v)).collect();
        self.send(point.step, What::Summary(Summary { value: values }));
    }

    /// A job event at `step` as text (`job/events`); a generation that formed also as the
    /// scalars `job/generation` and `job/world_size`.
    pub(crate) fn event(&mut self, step: u64, event: &JobEvent, world_size: Option<usize>) {
        let text = format!("generation {} {}: {}", event.generation, event.kind, event.detail);
        let mut values = vec![Value {
            tag: EVENTS_TAG.into(),
            kind: Some(Kind::Tensor(TensorProto {
                dtype: record::DT_STRING,
                string_val: vec![text.into_bytes()],
            })),
            metadata: Some(SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "text".into() }) }),
        }];
        if let Some(world_size) = world_size {
            values.push(scalar("job/generation".into(), event.generation as f64));
            values.push(scalar("job/world_size".into(), world_size as f64));
        }
        self.send(step, What::Summary(Summary { value: values }));
    }

    /// Queues an event; never waits. A full queue drops it; a writer thread that stopped (it
    /// logged why) turns this writer off.
    fn send(&mut self, step: u64, what: What) {
        let Some(events_tx) = &self.events_tx else { return };
        let event = Event { wall_time: unix_seconds(), step: step as i64, what: Some(what) };
        match events_tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if !std::mem::replace(&mut self.dropped_logged, true) {
                    tracing::warn!(
                        queued = QUEUE_EVENTS,
                        "the TensorBoard writer falls behind; dropping events"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => self.events_tx = None,
        }
    }

    /// Writes what is queued and closes the file.
    pub(crate) fn close(&mut self) {
        self.events_tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TensorBoard {
    fn drop(&mut self) {
        self.close();
    }
}

fn scalar(tag: String, value: f64) -> Value {
    Value { tag, kind: Some(Kind::SimpleValue(value as f32)), metadata: None }
}

fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Creates `dir` and a new event file in it, named as TensorFlow names them; a second
/// coordinator start within the same second gets a suffix.
fn create_file(dir: &Path) -> Result<(std::fs::File, PathBuf), (PathBuf, std::io::Error)> {
    std::fs::create_dir_all(dir).map_err(|err| (dir.to_owned(), err))?;
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let base = format!("events.out.tfevents.{secs}.{host}");
    let mut n = 0;
    loop {
        let name = if n == 0 { base.clone() } else { format!("{base}.{n}") };
        let path = dir.join(name);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((file, path)),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
            Err(err) => return Err((path, err)),
        }
    }
}

/// The writer thread: writes each event as it comes, flushing once the queue is empty; on an
/// I/O error logs it and stops (the sender then turns itself off).
fn write_events(file: std::fs::File, path: &Path, events_rx: Receiver<Event>) {
    let mut out = std::io::BufWriter::new(file);
    while let Ok(first) = events_rx.recv() {
        let written = std::iter::once(first)
            .chain(std::iter::from_fn(|| events_rx.try_recv().ok()))
            .try_for_each(|event| record::write_record(&mut out, &event.encode_to_vec()))
            .and_then(|()| out.flush());
        if let Err(err) = written {
            tracing::error!(path = %path.display(), %err, "cannot write TensorBoard events; writing no more of them for this job");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use mtl_proto::v1::{JobEvent, MetricPoint, MetricsKind};
    use prost::Message;

    use super::record::{read_records, Event, Kind, What};
    use super::TensorBoard;

    fn point(kind: MetricsKind, step: u64, values: &[(&str, f64)]) -> MetricPoint {
        MetricPoint {
            kind: kind as i32,
            step,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect::<HashMap<_, _>>(),
            ..Default::default()
        }
    }

    /// (step, tag, scalar or text) of every value in the one event file in `dir`, after the
    /// file version.
    fn read_back(dir: &std::path::Path) -> Vec<(i64, String, String)> {
        let files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let events: Vec<Event> = read_records(&std::fs::read(&files[0]).unwrap())
            .unwrap()
            .iter()
            .map(|r| Event::decode(r.as_slice()).unwrap())
            .collect();
        assert_eq!(events[0].what, Some(What::FileVersion("brain.Event:2".into())));
        let mut out = Vec::new();
        for e in &events[1..] {
            let Some(What::Summary(s)) = &e.what else { panic!("{e:?}") };
            for v in &s.value {
                let shown = match &v.kind {
                    Some(Kind::SimpleValue(x)) => x.to_string(),
                    Some(Kind::Tensor(t)) => String::from_utf8(t.string_val[0].clone()).unwrap(),
                    None => panic!("{v:?}"),
                };
                out.push((e.step, v.tag.clone(), shown));
            }
        }
        out
    }

    #[test]
    fn points_and_events_are_written_as_tagged_values_at_their_step() {
        let dir = tempfile::tempdir().unwrap();
        let tb_dir = dir.path().join("runs/j/tb");
        let mut tb = TensorBoard::open(Some(&tb_dir));
        let formed = JobEvent {
            generation: 1,
            kind: "formed".into(),
            detail: "2 worker(s)".into(),
            ..Default::default()
        };
        tb.event(0, &formed, Some(2));
        tb.point(&point(MetricsKind::Eval, 0, &[("accuracy", 0.125), ("AP50", -1.0), ("mIoU", 0.5)]));
        tb.point(&point(MetricsKind::Train, 4, &[("loss/cls", 2.5), ("lr", 0.05), ("images_per_s", 300.0)]));
        tb.close();
        let s = |step, tag: &str, v: &str| (step, tag.to_string(), v.to_string());
        assert_eq!(
            read_back(&tb_dir),
            [
                s(0, "job/events", "generation 1 formed: 2 worker(s)"),
                s(0, "job/generation", "1"),
                s(0, "job/world_size", "2"),
                s(0, "eval/detection/AP50", "-1"),
                s(0, "eval/classification/accuracy", "0.125"),
                s(0, "eval/segmentation/mIoU", "0.5"),
                s(4, "images_per_s", "300"),
                s(4, "loss/cls", "2.5"),
                s(4, "lr", "0.05"),
            ]
        );
    }

    #[test]
    fn off_writes_nothing_and_an_uncreatable_directory_only_turns_the_writer_off() {
        let mut off = TensorBoard::open(None);
        assert!(!off.is_on());
        off.point(&point(MetricsKind::Train, 1, &[("lr", 1.0)]));
        let mut unwritable = TensorBoard::open(Some(std::path::Path::new("/proc/no-such-dir/tb")));
        assert!(!unwritable.is_on());
        unwritable.point(&point(MetricsKind::Train, 1, &[("lr", 1.0)]));
    }

    #[test]
    fn a_write_error_turns_the_writer_off_without_failing_the_caller() {
        // Every write to /dev/full fails with ENOSPC, as a full disk does.
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let mut tb = TensorBoard::writing(full, "/dev/full".into());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut step = 0;
        while tb.is_on() {
            assert!(Instant::now() < deadline, "the writer did not notice the error");
            step += 1;
            tb.point(&point(MetricsKind::Train, step, &[("lr", 1.0)]));
            std::thread::yield_now();
        }
        tb.point(&point(MetricsKind::Train, step + 1, &[("lr", 1.0)]));
        tb.close();
    }
}
