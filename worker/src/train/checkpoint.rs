//! Model checkpoints on disk: `model.safetensors` (every variable of the network, names as in
//! the VarStore), `job.toml` (the job that trained it) and `dataset.json` (its label spaces).
//! Written into a temporary sibling directory, fsynced, then renamed over the target, so a
//! failed write leaves the previous checkpoint intact.
use std::fs;
use std::path::{Path, PathBuf};

use mtl_job::JobConfig;

use crate::data::DatasetInfo;
use crate::model::MultiTaskModel;
use crate::WorkerError;

const WEIGHTS: &str = "model.safetensors";
const JOB: &str = "job.toml";
const DATASET: &str = "dataset.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |source| WorkerError::Io { path: path.to_owned(), source }
}

/// Writes a checkpoint of `model` to `dir` atomically.
pub fn save(
    dir: &Path,
    model: &MultiTaskModel,
    cfg: &JobConfig,
    info: &DatasetInfo,
) -> Result<(), WorkerError> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io(parent))?;
    let name =
        dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let weights = tmp.join(WEIGHTS);
    model.var_store().save(&weights).map_err(|e| WorkerError::Weights {
        path: weights.clone(),
        name: String::new(),
        message: e.to_string(),
    })?;
    fs::write(tmp.join(JOB), cfg.to_toml()).map_err(io(&tmp))?;
    fs::write(tmp.join(DATASET), info_json(info)).map_err(io(&tmp))?;
    for f in [WEIGHTS, JOB, DATASET] {
        let p = tmp.join(f);
        fs::File::open(&p).and_then(|f| f.sync_all()).map_err(io(&p))?;
    }
    // Replace the old checkpoint only once the new one is complete on disk.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        fs::rename(dir, &old).map_err(io(dir))?;
    }
    fs::rename(&tmp, dir).map_err(io(dir))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    fs::File::open(parent).and_then(|d| d.sync_all()).ok();
    Ok(())
}

/// A checkpoint read back: the job it was trained with and the label spaces.
pub struct Loaded {
    /// The job that trained it.
    pub cfg: JobConfig,
    /// Its label spaces.
    pub info: DatasetInfo,
    /// The weights file, to load into a model built from `cfg` and `info`.
    pub weights: PathBuf,
}

/// Reads a checkpoint directory's config and label spaces (weights are loaded by [`load_into`]).
pub fn open(dir: &Path) -> Result<Loaded, WorkerError> {
    let job = dir.join(JOB);
    let text = fs::read_to_string(&job).map_err(io(&job))?;
    let cfg = JobConfig::from_toml(&text)?;
    let dataset = dir.join(DATASET);
    let text = fs::read_to_string(&dataset).map_err(io(&dataset))?;
    let info = info_from_json(&text).map_err(|message| WorkerError::Annotation {
        path: dataset.clone(),
        location: "dataset info".into(),
        message,
    })?;
    Ok(Loaded { cfg, info, weights: dir.join(WEIGHTS) })
}

/// Loads the checkpoint's weights into `model` (built from the checkpoint's config).
pub fn load_into(model: &mut MultiTaskModel, weights: &Path) -> Result<(), WorkerError> {
    model.var_store_mut().load(weights).map_err(|e| WorkerError::Weights {
        path: weights.to_owned(),
        name: String::new(),
        message: e.to_string(),
    })
}

fn info_json(info: &DatasetInfo) -> String {
    let v = serde_json::json!({
        "class_names": info.class_names,
        "multi_label": info.multi_label,
        "det_categories": info.det_categories.iter().map(|(id, name)| serde_json::json!({"id": id, "name": name})).collect::<Vec<_>>(),
        "seg_classes": info.seg_classes,
    });
    serde_json::to_string_pretty(&v).expect("json")
}

fn info_from_json(text: &str) -> Result<DatasetInfo, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let strings = |key: &str| -> Result<Vec<String>, String> {
        v[key]
            .as_array()
            .ok_or(format!("`{key}` must be a list"))?
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or(format!("`{key}` must hold strings")))
            .collect()
    };
    let det_categories = v["det_categories"]
        .as_array()
        .ok_or("`det_categories` must be a list")?
        .iter()
        .map(|c| {
            Ok((
                c["id"].as_u64().ok_or("det_categories[].id")?,
                c["name"].as_str().ok_or("det_categories[].name")?.to_string(),
            ))
        })
        .collect::<Result<Vec<_>, &str>>()?;
    Ok(DatasetInfo {
        class_names: strings("class_names")?,
        multi_label: v["multi_label"].as_bool().ok_or("`multi_label` must be a boolean")?,
        det_categories,
        seg_classes: strings("seg_classes")?,
    })
}
