//! COCO instances JSON: `images`, `annotations` (bbox, polygon or RLE `segmentation`,
//! `iscrowd`, `area`, `category_id`) and `categories`.
//!
//! The file is read by the metrics crate's COCO reader (`mtl_metrics::coco`), the same that
//! reads ground truth for `worker eval --gt`, so both follow one set of rules. Training needs
//! more than evaluation: every image needs `file_name`, `width` and `height`, every category a
//! `name`, and every annotation a category listed in `categories`.
//!
//! Categories are made contiguous in order of their ids. Per image: boxes are every
//! annotation (crowd ones flagged); the semantic mask paints each annotation in file order
//! with its category index + 1 (crowd regions with 255 = ignore) over a background of 0, and is
//! left unlabelled if some annotation of the image has no `segmentation`; the image-level class
//! follows the [`ClassRule`]. An image without annotations has no class label, 0 boxes and an
//! all-background mask.
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use mtl_job::ClassRule;
use mtl_metrics::coco::{parse_instances, read_json};
use mtl_metrics::MetricsError;
use serde_json::Value;

use super::batch::IGNORE_INDEX;
use super::rle::{check_polygon, Rle, Segmentation};
use super::sample::{BoxLabel, ClassLabel, Dataset, DatasetInfo, InstanceMasks, MaskSource, SampleRecord};
use crate::WorkerError;

struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn bad(&self, location: impl Into<String>, message: impl Into<String>) -> WorkerError {
        WorkerError::Annotation {
            path: self.path.to_owned(),
            location: location.into(),
            message: message.into(),
        }
    }
}

/// A JSON value for an error message, cut at 60 characters.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

fn numbers(v: &Value) -> Option<Vec<f64>> {
    v.as_array()?.iter().map(|x| x.as_f64().filter(|f| f.is_finite())).collect()
}

/// The reader's errors as the worker reports annotation files: the file, the field, the problem.
fn annotation_error(err: MetricsError) -> WorkerError {
    match err {
        MetricsError::Io { path, source } => WorkerError::Io { path, source },
        MetricsError::Json { path, source } => WorkerError::Annotation {
            path,
            location: "document".into(),
            message: format!("not JSON: {source}"),
        },
        MetricsError::Malformed { path, field, message } => {
            WorkerError::Annotation { path, location: field, message }
        }
        other => WorkerError::Metrics { message: other.to_string() },
    }
}

/// Reads a COCO instances file; image paths are `image_root/file_name`.
pub(crate) fn read_coco(path: &Path, image_root: &Path, rule: ClassRule) -> Result<Dataset, WorkerError> {
    let cx = Ctx { path };
    let doc = read_json(path).map_err(annotation_error)?;
    let coco = parse_instances(&doc, path).map_err(annotation_error)?;

    let mut cats: Vec<(u64, String)> = Vec::with_capacity(coco.categories.len());
    for (i, c) in coco.categories.iter().enumerate() {
        let name = c.name.ok_or_else(|| cx.bad(format!("categories[{i}].name"), "missing"))?;
        cats.push((c.id, name.to_string()));
    }
    cats.sort_by_key(|(id, _)| *id);
    if cats.len() >= usize::from(IGNORE_INDEX) {
        return Err(cx.bad("categories", format!("{} categories; masks hold at most 254", cats.len())));
    }
    let cat_index: HashMap<u64, u32> = cats.iter().enumerate().map(|(i, (id, _))| (*id, i as u32)).collect();

    let mut samples = Vec::with_capacity(coco.images.len());
    let mut dims = Vec::with_capacity(coco.images.len());
    for (i, img) in coco.images.iter().enumerate() {
        let missing = |key: &str| cx.bad(format!("images[{i}].{key}"), "missing");
        let file = img.file_name.ok_or_else(|| missing("file_name"))?;
        let width = img.width.ok_or_else(|| missing("width"))?;
        let height = img.height.ok_or_else(|| missing("height"))?;
        dims.push((width, height));
        samples.push(SampleRecord {
            id: img.id,
            image: image_root.join(file),
            class: None,
            boxes: Some(Vec::new()),
            mask: Some(MaskSource::Instances(InstanceMasks { width, height, shapes: Vec::new() })),
        });
    }

    let mut areas: Vec<HashMap<u32, f64>> = vec![HashMap::new(); samples.len()];
    for (i, ann) in coco.annotations.iter().enumerate() {
        let at = format!("annotations[{i}]");
        let &category = cat_index.get(&ann.category_id).ok_or_else(|| {
            cx.bad(format!("{at}.category_id"), format!("unknown category id {}", ann.category_id))
        })?;
        let (width, height) = dims[ann.image];
        let segmentation = match ann.segmentation {
            None => None,
            Some(v) => Some(parse_segmentation(&cx, &format!("{at}.segmentation"), v, height, width)?),
        };
        let sample = &mut samples[ann.image];
        let [x, y, w, h] = ann.bbox;
        sample.boxes.get_or_insert_with(Vec::new).push(BoxLabel {
            x,
            y,
            w,
            h,
            category,
            iscrowd: ann.iscrowd,
            area: ann.area,
        });
        match (segmentation, &mut sample.mask) {
            (Some(seg), Some(MaskSource::Instances(m))) => {
                let value = if ann.iscrowd { IGNORE_INDEX } else { category as u8 + 1 };
                m.shapes.push((value, seg));
            }
            (None, mask) => *mask = None,
            (Some(_), _) => {}
        }
        if !ann.iscrowd {
            *areas[ann.image].entry(category).or_insert(0.0) += ann.area;
        }
    }

    for (sample, area) in samples.iter_mut().zip(&areas) {
        sample.class = class_from(area, rule);
    }
    let names: Vec<String> = cats.iter().map(|(_, n)| n.clone()).collect();
    let mut seg_classes = vec!["background".to_string()];
    seg_classes.extend(names.iter().cloned());
    let info = DatasetInfo {
        class_names: names,
        multi_label: rule == ClassRule::Presence,
        det_categories: cats,
        seg_classes,
    };
    Ok(Dataset::new(info, samples))
}

fn class_from(area: &HashMap<u32, f64>, rule: ClassRule) -> Option<ClassLabel> {
    if area.is_empty() {
        return None;
    }
    Some(match rule {
        ClassRule::Presence => {
            ClassLabel::Multi(area.keys().copied().collect::<BTreeSet<_>>().into_iter().collect())
        }
        ClassRule::LargestArea => {
            // Largest total area; ties go to the smaller category index.
            let (&cat, _) =
                area.iter().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0))).expect("non-empty");
            ClassLabel::Single(cat)
        }
    })
}

fn parse_segmentation(
    cx: &Ctx<'_>,
    at: &str,
    v: &Value,
    height: u32,
    width: u32,
) -> Result<Segmentation, WorkerError> {
    if let Some(polys) = v.as_array() {
        let mut out = Vec::with_capacity(polys.len());
        for (j, p) in polys.iter().enumerate() {
            let xy = numbers(p).filter(|xy| xy.len() % 2 == 0).ok_or_else(|| {
                cx.bad(
                    format!("{at}[{j}]"),
                    format!("expected a polygon [x0, y0, x1, y1, ...], got {}", short(p)),
                )
            })?;
            check_polygon(&xy, height, width).map_err(|m| cx.bad(format!("{at}[{j}]"), m))?;
            if !xy.is_empty() {
                out.push(xy);
            }
        }
        return Ok(Segmentation::Polygons(out));
    }
    let size = v.get("size").and_then(numbers).filter(|s| s.len() == 2).ok_or_else(|| {
        cx.bad(format!("{at}.size"), "expected an RLE object with size [height, width] and counts")
    })?;
    if size[0] != f64::from(height) || size[1] != f64::from(width) {
        return Err(cx.bad(
            format!("{at}.size"),
            format!("RLE size [{}, {}] does not match the image's [{height}, {width}]", size[0], size[1]),
        ));
    }
    let counts = v.get("counts").ok_or_else(|| cx.bad(format!("{at}.counts"), "missing"))?;
    let rle = match counts {
        Value::String(s) => Rle::from_compressed(s, height, width),
        Value::Array(items) => items
            .iter()
            .map(|c| c.as_u64().and_then(|c| u32::try_from(c).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| "counts must be non-negative integers".to_string())
            .and_then(|counts| Rle::new(height, width, counts)),
        other => Err(format!("expected a list or string of counts, got {}", short(other))),
    }
    .map_err(|m| cx.bad(format!("{at}.counts"), m))?;
    Ok(Segmentation::Rle(rle))
}

#[cfg(test)]
mod tests;
