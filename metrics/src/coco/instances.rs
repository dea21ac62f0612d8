//! The one reader of COCO instances JSON, shared by the worker (training and evaluation data)
//! and this crate (ground truth for `worker eval --gt`), so that both read a file the same way.
//!
//! pycocotools is the reference for what a field means; where it would crash or silently
//! misbehave the reader fails instead, naming the file and the field:
//! - `images` and `categories` are required arrays; `annotations` may be missing (no objects).
//! - `images[i].id`, `categories[i].id` and `annotations[i].id` are non-negative integers, each
//!   unique in its list (pycocotools indexes all three by id: a duplicate silently replaces the
//!   earlier entry in its evaluation). `file_name`, `width` and `height` of an image and `name` of
//!   a category are optional here (evaluation does not need them; training does, and the worker
//!   checks them).
//! - `annotations[i].image_id` must be one of `images`. `category_id` may be any id: an
//!   annotation of a category not in `categories` is kept, and never evaluated, as pycocotools
//!   does (the worker, which needs a class index, rejects it).
//! - `bbox` is 4 finite numbers `[x, y, w, h]` with `w, h >= 0`.
//! - `area` is required, a finite number >= 0: pycocotools' evaluation reads it for the
//!   small/medium/large ranges (for instances it is the mask area, not the box area).
//! - `iscrowd` is 0, 1, `false` or `true`; missing means not a crowd (pycocotools:
//!   `'iscrowd' in gt and gt['iscrowd']`).
//! - `segmentation` (polygons or RLE) is handed to the caller as JSON, `null` as absent: the
//!   worker rasterises it, evaluation of boxes ignores it.
//!
//! The file order of annotations is kept: it paints masks and breaks ties in evaluation.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::{Map, Value};

use super::Ctx;
use crate::detection::GroundTruth;
use crate::MetricsError;

/// A parsed COCO instances file, borrowing from its JSON value.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoInstances<'a> {
    /// `images`, in file order.
    pub images: Vec<CocoImage<'a>>,
    /// `categories`, in file order.
    pub categories: Vec<CocoCategory<'a>>,
    /// `annotations`, in file order.
    pub annotations: Vec<CocoAnnotation<'a>>,
}

/// One entry of `images`.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoImage<'a> {
    /// Image id.
    pub id: u64,
    /// `file_name`, relative to the image root.
    pub file_name: Option<&'a str>,
    /// `width` in pixels (positive).
    pub width: Option<u32>,
    /// `height` in pixels (positive).
    pub height: Option<u32>,
}

/// One entry of `categories`.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoCategory<'a> {
    /// Category id.
    pub id: u64,
    /// `name`.
    pub name: Option<&'a str>,
}

/// One entry of `annotations`.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoAnnotation<'a> {
    /// Annotation id.
    pub id: u64,
    /// The image's id.
    pub image_id: u64,
    /// The image's position in [`CocoInstances::images`].
    pub image: usize,
    /// Category id (not necessarily in `categories`).
    pub category_id: u64,
    /// `[x, y, w, h]` in the image's pixels.
    pub bbox: [f64; 4],
    /// COCO's `area`, in the image's pixels.
    pub area: f64,
    /// A crowd region.
    pub iscrowd: bool,
    /// Polygons or RLE, as written; `None` when missing or `null`.
    pub segmentation: Option<&'a Value>,
}

impl CocoAnnotation<'_> {
    /// The annotation as ground truth for box evaluation.
    pub fn ground_truth(&self) -> GroundTruth {
        GroundTruth { bbox: self.bbox, category_id: self.category_id, area: self.area, iscrowd: self.iscrowd }
    }
}

/// Reads and parses a JSON file; errors name the file.
pub fn read_json(path: &Path) -> Result<Value, MetricsError> {
    let bytes =
        std::fs::read(path).map_err(|source| MetricsError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| MetricsError::Json { path: path.to_path_buf(), source })
}

/// Parses a COCO instances document by the rules of this module; `path` names the file in
/// errors.
pub fn parse_instances<'a>(root: &'a Value, path: &Path) -> Result<CocoInstances<'a>, MetricsError> {
    let cx = Ctx { path };
    let root = root.as_object().ok_or_else(|| cx.err("<root>", "expected an object"))?;
    let list = |name: &str, required: bool| -> Result<&'a [Value], MetricsError> {
        match root.get(name) {
            Some(Value::Array(items)) => Ok(items),
            Some(_) => Err(cx.err(name, "expected an array")),
            None if required => Err(cx.err(name, "missing")),
            None => Ok(&[]),
        }
    };

    let mut images = Vec::new();
    let mut image_index = HashMap::new();
    for (i, item) in list("images", true)?.iter().enumerate() {
        let at = format!("images[{i}]");
        let obj = cx.object(item, &at)?;
        let id = cx.id(obj.get("id"), &format!("{at}.id"))?;
        if image_index.insert(id, images.len()).is_some() {
            return Err(cx.err(&format!("{at}.id"), &format!("duplicate image id {id}")));
        }
        images.push(CocoImage {
            id,
            file_name: cx.optional_str(obj, &at, "file_name")?,
            width: cx.optional_size(obj, &at, "width")?,
            height: cx.optional_size(obj, &at, "height")?,
        });
    }

    let mut categories = Vec::new();
    let mut category_ids = HashSet::new();
    for (i, item) in list("categories", true)?.iter().enumerate() {
        let at = format!("categories[{i}]");
        let obj = cx.object(item, &at)?;
        let id = cx.id(obj.get("id"), &format!("{at}.id"))?;
        if !category_ids.insert(id) {
            return Err(cx.err(&format!("{at}.id"), &format!("duplicate category id {id}")));
        }
        categories.push(CocoCategory { id, name: cx.optional_str(obj, &at, "name")? });
    }

    let mut annotations = Vec::new();
    let mut annotation_ids = HashSet::new();
    for (i, item) in list("annotations", false)?.iter().enumerate() {
        let at = format!("annotations[{i}]");
        let field = |name: &str| format!("{at}.{name}");
        let obj = cx.object(item, &at)?;
        let id = cx.id(obj.get("id"), &field("id"))?;
        if !annotation_ids.insert(id) {
            return Err(cx.err(&field("id"), &format!("duplicate annotation id {id}")));
        }
        let image_id = cx.id(obj.get("image_id"), &field("image_id"))?;
        let &image = image_index
            .get(&image_id)
            .ok_or_else(|| cx.err(&field("image_id"), &format!("image id {image_id} is not in images")))?;
        let category_id = cx.id(obj.get("category_id"), &field("category_id"))?;
        let bbox = cx.bbox(obj.get("bbox"), &field("bbox"))?;
        if bbox[2] < 0.0 || bbox[3] < 0.0 {
            return Err(cx.err(&field("bbox"), &format!("width and height must be >= 0, found {bbox:?}")));
        }
        let area = cx.number(obj.get("area"), &field("area"))?;
        if area < 0.0 {
            return Err(cx.err(&field("area"), &format!("expected a number >= 0, found {area}")));
        }
        let iscrowd = match obj.get("iscrowd") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => match v.as_u64() {
                Some(0) => false,
                Some(1) => true,
                _ => return Err(cx.err(&field("iscrowd"), "expected 0, 1 or a boolean")),
            },
        };
        let segmentation = obj.get("segmentation").filter(|v| !v.is_null());
        annotations.push(CocoAnnotation {
            id,
            image_id,
            image,
            category_id,
            bbox,
            area,
            iscrowd,
            segmentation,
        });
    }
    Ok(CocoInstances { images, categories, annotations })
}

impl Ctx<'_> {
    fn object<'v>(&self, v: &'v Value, at: &str) -> Result<&'v Map<String, Value>, MetricsError> {
        v.as_object().ok_or_else(|| self.err(at, "expected an object"))
    }

    fn optional_str<'v>(
        &self,
        obj: &'v Map<String, Value>,
        at: &str,
        key: &str,
    ) -> Result<Option<&'v str>, MetricsError> {
        match obj.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => {
                Err(self.err(&format!("{at}.{key}"), &format!("expected a string, found {}", short(v))))
            }
        }
    }

    fn optional_size(
        &self,
        obj: &Map<String, Value>,
        at: &str,
        key: &str,
    ) -> Result<Option<u32>, MetricsError> {
        match obj.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().and_then(|n| u32::try_from(n).ok()).filter(|&n| n > 0).map(Some).ok_or_else(|| {
                    self.err(
                        &format!("{at}.{key}"),
                        &format!("expected a positive integer, found {}", short(v)),
                    )
                })
            }
        }
    }
}

/// A JSON value for an error message, cut at 60 characters.
pub(super) fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}
