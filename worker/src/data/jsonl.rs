//! The JSONL manifest: one JSON object a line,
//! `{"file": "img/a.png", "class": 2, "boxes": [[x, y, w, h, cat], ...], "mask": "m/a.png"}`.
//!
//! `file` is required; `class`, `boxes` and `mask` are each optional and a missing key means
//! that task is unlabelled for that sample (`"boxes": []` is labelled with no objects). Paths
//! are relative to the manifest's directory. An optional `"id"` (integer) overrides the
//! default id, the 0-based line number. Label spaces come from `dataset.json` next to the
//! manifest when present (`{"class_names": [...], "det_categories": [...], "seg_classes":
//! [...]}`, seg class 0 = background), otherwise they are numbered from the largest ids seen.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::sample::{BoxLabel, ClassLabel, Dataset, DatasetInfo, MaskSource, SampleRecord};
use crate::WorkerError;

/// Name of the optional label-space file next to a manifest.
pub(crate) const INFO_FILE: &str = "dataset.json";

fn bad(path: &Path, location: String, message: impl Into<String>) -> WorkerError {
    WorkerError::Annotation { path: path.to_owned(), location, message: message.into() }
}

/// Reads a manifest and checks every line against the label spaces.
pub(crate) fn read_manifest(path: &Path) -> Result<Dataset, WorkerError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| WorkerError::Io { path: path.into(), source })?;
    let root = path.parent().unwrap_or(Path::new("")).to_owned();
    let mut samples = Vec::new();
    let mut ids = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = parse_line(path, &root, index, line)?;
        if !ids.insert(record.id) {
            return Err(bad(
                path,
                format!("line {}, field `id`", index + 1),
                format!("duplicate id {}", record.id),
            ));
        }
        samples.push(record);
    }
    let info_path = root.join(INFO_FILE);
    let info = if info_path.is_file() { read_info(&info_path)? } else { derive_info(&samples) };
    for (index, s) in samples.iter().enumerate() {
        let at = |field: &str| format!("sample id {} (record {}), field `{field}`", s.id, index + 1);
        if let Some(ClassLabel::Single(c)) = s.class {
            if c as usize >= info.class_names.len() {
                let n = info.class_names.len();
                return Err(bad(
                    path,
                    at("class"),
                    format!("class {c} is not below the {n} classes in {INFO_FILE}"),
                ));
            }
        }
        for b in s.boxes.iter().flatten() {
            if b.category as usize >= info.det_categories.len() {
                let n = info.det_categories.len();
                return Err(bad(
                    path,
                    at("boxes"),
                    format!("category {} is not below the {n} categories", b.category),
                ));
            }
        }
    }
    Ok(Dataset::new(info, samples))
}

fn parse_line(path: &Path, root: &Path, index: usize, line: &str) -> Result<SampleRecord, WorkerError> {
    let lineno = index + 1;
    let at = |field: &str| format!("line {lineno}, field `{field}`");
    let value: Value = serde_json::from_str(line)
        .map_err(|e| bad(path, format!("line {lineno}"), format!("not JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(bad(path, format!("line {lineno}"), "expected a JSON object"));
    };
    for key in obj.keys() {
        if !["file", "id", "class", "boxes", "mask"].contains(&key.as_str()) {
            return Err(bad(path, at(key), "unknown field (expected file, id, class, boxes, mask)"));
        }
    }
    let file = match obj.get("file") {
        Some(Value::String(s)) if !s.is_empty() => root.join(s),
        Some(other) => {
            return Err(bad(path, at("file"), format!("expected a non-empty string, got {other}")))
        }
        None => return Err(bad(path, format!("line {lineno}"), "missing field `file`")),
    };
    let id = match obj.get("id") {
        None => index as u64,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad(path, at("id"), format!("expected a non-negative integer, got {v}")))?,
    };
    let class =
        match obj.get("class") {
            None | Some(Value::Null) => None,
            Some(v) => Some(ClassLabel::Single(as_u32(v).ok_or_else(|| {
                bad(path, at("class"), format!("expected a non-negative integer, got {v}"))
            })?)),
        };
    let boxes = match obj.get("boxes") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_box(item).map_err(|m| bad(path, at(&format!("boxes[{i}]")), m)))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(other) => {
            return Err(bad(path, at("boxes"), format!("expected an array of boxes, got {other}")))
        }
    };
    let mask = match obj.get("mask") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(MaskSource::Png(root.join(s))),
        Some(other) => return Err(bad(path, at("mask"), format!("expected a PNG path, got {other}"))),
    };
    Ok(SampleRecord { id, image: file, class, boxes, mask })
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

fn parse_box(item: &Value) -> Result<BoxLabel, String> {
    let nums = item
        .as_array()
        .filter(|a| a.len() == 5)
        .ok_or_else(|| format!("expected [x, y, w, h, category], got {item}"))?;
    let f = |i: usize| {
        nums[i]
            .as_f64()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("element {i} is not a number: {}", nums[i]))
    };
    let (x, y, w, h) = (f(0)?, f(1)?, f(2)?, f(3)?);
    if w < 0.0 || h < 0.0 {
        return Err(format!("negative width or height in {item}"));
    }
    let category =
        as_u32(&nums[4]).ok_or_else(|| format!("category is not a non-negative integer: {}", nums[4]))?;
    Ok(BoxLabel { x, y, w, h, category, iscrowd: false, area: w * h })
}

fn read_info(path: &Path) -> Result<DatasetInfo, WorkerError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| WorkerError::Io { path: path.into(), source })?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| bad(path, "document".into(), format!("not JSON: {e}")))?;
    let names = |key: &str| -> Result<Vec<String>, WorkerError> {
        match value.get(key) {
            None => Ok(Vec::new()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                bad(path, format!("field `{key}`"), format!("expected an array of strings, got {v}"))
            }),
        }
    };
    let multi_label = match value.get("multi_label") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad(path, "field `multi_label`".into(), format!("expected a bool, got {v}")))?,
    };
    if multi_label {
        return Err(bad(
            path,
            "field `multi_label`".into(),
            "JSONL manifests carry single-label classes only",
        ));
    }
    let det = names("det_categories")?;
    Ok(DatasetInfo {
        class_names: names("class_names")?,
        multi_label,
        det_categories: det.into_iter().enumerate().map(|(i, n)| (i as u64, n)).collect(),
        seg_classes: names("seg_classes")?,
    })
}

fn derive_info(samples: &[SampleRecord]) -> DatasetInfo {
    let n_classes = samples
        .iter()
        .filter_map(|s| match s.class {
            Some(ClassLabel::Single(c)) => Some(c + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let n_cats =
        samples.iter().flat_map(|s| s.boxes.iter().flatten()).map(|b| b.category + 1).max().unwrap_or(0);
    let det_categories: Vec<(u64, String)> =
        (0..n_cats).map(|c| (u64::from(c), format!("category_{c}"))).collect();
    let mut seg_classes = vec!["background".to_string()];
    seg_classes.extend(det_categories.iter().map(|(_, n)| n.clone()));
    DatasetInfo {
        class_names: (0..n_classes).map(|c| format!("class_{c}")).collect(),
        multi_label: false,
        det_categories,
        seg_classes,
    }
}

/// Writes `dataset.json` for a manifest directory (used by the synthetic generator).
pub(crate) fn write_info(dir: &Path, info: &DatasetInfo) -> Result<PathBuf, WorkerError> {
    let path = dir.join(INFO_FILE);
    let value = serde_json::json!({
        "class_names": info.class_names,
        "det_categories": info.det_categories.iter().map(|(_, n)| n).collect::<Vec<_>>(),
        "seg_classes": info.seg_classes,
    });
    let text = serde_json::to_string_pretty(&value).expect("JSON value serialises") + "\n";
    std::fs::write(&path, text).map_err(|source| WorkerError::Io { path: path.clone(), source })?;
    Ok(path)
}

#[cfg(test)]
mod tests;
