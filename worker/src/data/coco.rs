//! COCO instances JSON: `images`, `annotations` (bbox, polygon or RLE `segmentation`,
//! `iscrowd`, `area`, `category_id`) and `categories`.
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
use serde_json::Value;

use super::batch::IGNORE_INDEX;
use super::rle::{Rle, Segmentation};
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

    fn field<'v>(&self, obj: &'v Value, at: &str, key: &str) -> Result<&'v Value, WorkerError> {
        obj.get(key).ok_or_else(|| self.bad(at, format!("missing field `{key}`")))
    }

    fn array<'v>(&self, obj: &'v Value, at: &str, key: &str) -> Result<&'v Vec<Value>, WorkerError> {
        let v = self.field(obj, at, key)?;
        v.as_array()
            .ok_or_else(|| self.bad(format!("{at}.{key}"), format!("expected an array, got {}", short(v))))
    }

    fn uint(&self, obj: &Value, at: &str, key: &str) -> Result<u64, WorkerError> {
        let v = self.field(obj, at, key)?;
        v.as_u64().ok_or_else(|| {
            self.bad(format!("{at}.{key}"), format!("expected a non-negative integer, got {}", short(v)))
        })
    }

    fn string<'v>(&self, obj: &'v Value, at: &str, key: &str) -> Result<&'v str, WorkerError> {
        let v = self.field(obj, at, key)?;
        v.as_str()
            .ok_or_else(|| self.bad(format!("{at}.{key}"), format!("expected a string, got {}", short(v))))
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..60])
    } else {
        s
    }
}

fn numbers(v: &Value) -> Option<Vec<f64>> {
    v.as_array()?.iter().map(|x| x.as_f64().filter(|f| f.is_finite())).collect()
}

/// Reads a COCO instances file; image paths are `image_root/file_name`.
pub fn read_coco(path: &Path, image_root: &Path, rule: ClassRule) -> Result<Dataset, WorkerError> {
    let cx = Ctx { path };
    let text =
        std::fs::read_to_string(path).map_err(|source| WorkerError::Io { path: path.into(), source })?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| cx.bad("document", format!("not JSON: {e}")))?;
    if !doc.is_object() {
        return Err(cx.bad("document", "expected a JSON object with images, annotations, categories"));
    }

    let mut cats: Vec<(u64, String)> = Vec::new();
    for (i, c) in cx.array(&doc, "document", "categories")?.iter().enumerate() {
        let at = format!("categories[{i}]");
        cats.push((cx.uint(c, &at, "id")?, cx.string(c, &at, "name")?.to_string()));
    }
    cats.sort_by_key(|(id, _)| *id);
    if cats.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(cx.bad("categories", "duplicate category id"));
    }
    if cats.len() >= usize::from(IGNORE_INDEX) {
        return Err(cx.bad("categories", format!("{} categories; masks hold at most 254", cats.len())));
    }
    let cat_index: HashMap<u64, u32> = cats.iter().enumerate().map(|(i, (id, _))| (*id, i as u32)).collect();

    let mut samples = Vec::new();
    let mut by_image: HashMap<u64, usize> = HashMap::new();
    let mut dims: Vec<(u32, u32)> = Vec::new();
    for (i, img) in cx.array(&doc, "document", "images")?.iter().enumerate() {
        let at = format!("images[{i}]");
        let id = cx.uint(img, &at, "id")?;
        let file = cx.string(img, &at, "file_name")?;
        let width = u32::try_from(cx.uint(img, &at, "width")?).unwrap_or(0);
        let height = u32::try_from(cx.uint(img, &at, "height")?).unwrap_or(0);
        if width == 0 || height == 0 {
            return Err(cx.bad(at, "width and height must be positive integers"));
        }
        if by_image.insert(id, samples.len()).is_some() {
            return Err(cx.bad(format!("{at}.id"), format!("duplicate image id {id}")));
        }
        dims.push((width, height));
        samples.push(SampleRecord {
            id,
            image: image_root.join(file),
            class: None,
            boxes: Some(Vec::new()),
            mask: Some(MaskSource::Instances(InstanceMasks { width, height, shapes: Vec::new() })),
        });
    }

    let empty = Vec::new();
    let anns = match doc.get("annotations") {
        None => &empty,
        Some(_) => cx.array(&doc, "document", "annotations")?,
    };
    let mut areas: Vec<HashMap<u32, f64>> = vec![HashMap::new(); samples.len()];
    for (i, ann) in anns.iter().enumerate() {
        let at = format!("annotations[{i}]");
        let image_id = cx.uint(ann, &at, "image_id")?;
        let &slot = by_image
            .get(&image_id)
            .ok_or_else(|| cx.bad(format!("{at}.image_id"), format!("unknown image id {image_id}")))?;
        let cat_id = cx.uint(ann, &at, "category_id")?;
        let &category = cat_index
            .get(&cat_id)
            .ok_or_else(|| cx.bad(format!("{at}.category_id"), format!("unknown category id {cat_id}")))?;
        let bbox = cx.field(ann, &at, "bbox")?;
        let b = numbers(bbox).filter(|b| b.len() == 4 && b[2] >= 0.0 && b[3] >= 0.0).ok_or_else(|| {
            cx.bad(
                format!("{at}.bbox"),
                format!("expected 4 numbers [x, y, w, h], w, h >= 0, got {}", short(bbox)),
            )
        })?;
        let iscrowd = match ann.get("iscrowd") {
            None => false,
            Some(v) => match v.as_u64() {
                Some(0) => false,
                Some(1) => true,
                _ => {
                    return Err(cx.bad(format!("{at}.iscrowd"), format!("expected 0 or 1, got {}", short(v))))
                }
            },
        };
        let area = match ann.get("area") {
            None => b[2] * b[3],
            Some(v) => v.as_f64().filter(|a| *a >= 0.0).ok_or_else(|| {
                cx.bad(format!("{at}.area"), format!("expected a non-negative number, got {}", short(v)))
            })?,
        };
        let (width, height) = dims[slot];
        let segmentation = match ann.get("segmentation") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_segmentation(&cx, &format!("{at}.segmentation"), v, height, width)?),
        };
        let sample = &mut samples[slot];
        sample.boxes.get_or_insert_with(Vec::new).push(BoxLabel {
            x: b[0] as f32,
            y: b[1] as f32,
            w: b[2] as f32,
            h: b[3] as f32,
            category,
            iscrowd,
            area: area as f32,
        });
        match (segmentation, &mut sample.mask) {
            (Some(seg), Some(MaskSource::Instances(m))) => {
                let value = if iscrowd { IGNORE_INDEX } else { category as u8 + 1 };
                m.shapes.push((value, seg));
            }
            (None, mask) => *mask = None,
            (Some(_), _) => {}
        }
        if !iscrowd {
            *areas[slot].entry(category).or_insert(0.0) += area;
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
    Ok(Dataset { info, samples })
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
            let limit = 4.0 * f64::from(height.max(width));
            if let Some(v) = xy.iter().find(|v| v.abs() > limit) {
                return Err(cx.bad(
                    format!("{at}[{j}]"),
                    format!("coordinate {v} is far outside the {width}x{height} image"),
                ));
            }
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
    let rle = match cx.field(v, at, "counts")? {
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
