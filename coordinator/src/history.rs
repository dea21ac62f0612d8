//! The job's metrics history: every training report and merged evaluation, in memory for
//! `Status`, in the state database for a restarted coordinator, and appended to
//! `metrics.jsonl` and TensorBoard event files as exports for people and scripts.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use mtl_proto::v1::{JobEvent, MetricPoint, MetricsKind};

use crate::store::Store;
use crate::tensorboard::TensorBoard;
use crate::CoordinatorError;

#[derive(Debug)]
pub(crate) struct History {
    points: Vec<MetricPoint>,
    file: std::fs::File,
    path: PathBuf,
    tensorboard: TensorBoard,
}

impl History {
    /// Opens (appends to) the export file, naming it if that fails; `points` are the ones a
    /// restarted coordinator reloaded (already exported). TensorBoard files go into
    /// `tensorboard_dir` unless it is `None`.
    pub(crate) fn open(
        path: PathBuf,
        points: Vec<MetricPoint>,
        tensorboard_dir: Option<&Path>,
    ) -> Result<Self, CoordinatorError> {
        let io = |source| CoordinatorError::Io { path: path.clone(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        Ok(Self { points, file, path, tensorboard: TensorBoard::open(tensorboard_dir) })
    }

    pub(crate) fn points(&self) -> &[MetricPoint] {
        &self.points
    }

    /// Adds a point: to the store, the export files and memory. A failed write is logged, not
    /// fatal: training goes on and `Status` still has the point.
    pub(crate) fn record(&mut self, point: MetricPoint, store: &mut Store) {
        if let Err(err) = store.insert_metric(&point) {
            tracing::error!(%err, "cannot store a metrics point");
        }
        let kind = if point.kind == MetricsKind::Eval as i32 { "eval" } else { "train" };
        let values: BTreeMap<&String, &f64> = point.values.iter().collect();
        let line = format!(
            "{{\"kind\":\"{kind}\",\"generation\":{},\"epoch\":{},\"step\":{},\"rank\":{},\"values\":{}}}\n",
            point.generation,
            point.epoch,
            point.step,
            point.rank,
            serde_json::to_string(&values).expect("metric values serialise")
        );
        if let Err(err) = self.file.write_all(line.as_bytes()) {
            tracing::error!(path = %self.path.display(), %err, "cannot append to the metrics file");
        }
        self.tensorboard.point(&point);
        self.points.push(point);
    }

    /// Exports a job event (generations formed and ended, ...) at `step`, with the world size
    /// of a generation that formed.
    pub(crate) fn event(&mut self, step: u64, event: &JobEvent, world_size: Option<usize>) {
        self.tensorboard.event(step, event, world_size);
    }

    /// Writes what the exports still hold; the job is over.
    pub(crate) fn close(&mut self) {
        self.tensorboard.close();
    }

    /// The metrics that describe the model at `step`: the merged evaluation of that step (if
    /// any), and the training scalars reported last at or before it.
    pub(crate) fn at_step(&self, step: u64) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let train = self.points.iter().rev().find(|p| p.kind == MetricsKind::Train as i32 && p.step <= step);
        let eval = self.points.iter().rev().find(|p| p.kind == MetricsKind::Eval as i32 && p.step == step);
        for p in train.into_iter().chain(eval) {
            out.extend(p.values.iter().map(|(k, v)| (k.clone(), *v)));
        }
        out
    }
}
