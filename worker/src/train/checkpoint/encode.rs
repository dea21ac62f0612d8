//! The bytes of a checkpoint's files: named tensors as safetensors (what PyTorch users read
//! with the `safetensors` package) and the dataset's label spaces as JSON.
use std::borrow::Cow;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Tensor};

use crate::data::DatasetInfo;
use crate::WorkerError;

/// A tensor's bytes on the host, as safetensors stores them (row-major, little-endian).
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// `named` as a safetensors file (entries sorted by dtype, then name, so the bytes depend
/// only on the values).
pub(super) fn tensors_to_bytes(named: &[(String, Tensor)], file: &str) -> Result<Vec<u8>, WorkerError> {
    let views = named
        .iter()
        .map(|(name, tensor)| {
            let host = tensor.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
            let numel = host.numel();
            let mut data = vec![0u8; numel * host.kind().elt_size_in_bytes()];
            host.f_copy_data_u8(&mut data, numel)?;
            let shape = host.size().iter().map(|&d| d as usize).collect();
            Ok((name.as_str(), HostTensor { dtype: Dtype::try_from(host.kind())?, shape, data }))
        })
        .collect::<Result<Vec<_>, WorkerError>>()?;
    safetensors::tensor::serialize(views, &None)
        .map_err(|e| WorkerError::Checkpoint { path: file.into(), message: format!("cannot encode: {e}") })
}

/// The named tensors of a safetensors file's bytes (on the CPU, sorted by name).
pub(super) fn tensors_from_bytes(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>, WorkerError> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| WorkerError::Checkpoint { path: path.to_owned(), message: e.to_string() })?;
    let mut named = file
        .tensors()
        .into_iter()
        .map(|(name, view)| Ok((name, Tensor::try_from(view)?)))
        .collect::<Result<Vec<_>, WorkerError>>()?;
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(named)
}

pub(super) fn info_json(info: &DatasetInfo) -> String {
    let v = serde_json::json!({
        "class_names": info.class_names,
        "multi_label": info.multi_label,
        "det_categories": info.det_categories.iter().map(|(id, name)| serde_json::json!({"id": id, "name": name})).collect::<Vec<_>>(),
        "seg_classes": info.seg_classes,
    });
    serde_json::to_string_pretty(&v).expect("json")
}

pub(super) fn info_from_json(text: &str) -> Result<DatasetInfo, String> {
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
