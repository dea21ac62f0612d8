//! Property tests: the readers of files a job names (COCO instances JSON, JSONL manifests and
//! their `dataset.json`) and the COCO mask code (RLE decoding, polygon rasterisation) return
//! a value or an error on arbitrary input, never panic. `make test` runs a few hundred cases
//! each; `PROPTEST_CASES=20000 cargo test -p mtl-worker --lib proptests` searches longer.
use std::collections::BTreeMap;

use mtl_job::ClassRule;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{Map, Value};

use super::coco::read_coco;
use super::jsonl::read_manifest;
use super::rle::{rasterise, Rle, Segmentation};
use super::sample::MaskSource;

/// `cases` unless `PROPTEST_CASES` says otherwise.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

/// Numbers as JSON: small plausible ones, extremes, fractions, negatives.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (-2i64..12).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        1 => (-20.0f64..40.0).prop_map(Value::from),
    ]
}

/// Any JSON leaf, with strings that look like file names, RLE strings and junk.
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        "[a-z0-9_./]{0,8}".prop_map(Value::from),
        "[0-9A-Za-z\\[\\]\\\\`_^]{0,12}".prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
    ]
}

const KEYS: &[&str] = &[
    "id",
    "image_id",
    "category_id",
    "file_name",
    "width",
    "height",
    "bbox",
    "segmentation",
    "counts",
    "size",
    "area",
    "iscrowd",
    "name",
    "images",
    "annotations",
    "categories",
    "file",
    "class",
    "boxes",
    "mask",
    "class_names",
    "det_categories",
    "seg_classes",
    "multi_label",
];

/// Arbitrary JSON whose object keys are mostly the ones the readers look for.
fn json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![9 => proptest::sample::select(KEYS).prop_map(str::to_string), 1 => "[a-z]{1,4}"];
    leaf().prop_recursive(4, 64, 6, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(key.clone(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `value`, or now and then something arbitrary in its place, or nothing.
fn field(value: impl Strategy<Value = Value> + 'static) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![8 => value.prop_map(Some), 1 => json().prop_map(Some), 1 => Just(None)]
}

fn object(fields: Vec<(&'static str, BoxedStrategy<Option<Value>>)>) -> impl Strategy<Value = Value> {
    let (names, values): (Vec<_>, Vec<_>) = fields.into_iter().unzip();
    values.prop_map(move |values| {
        let map: Map<String, Value> =
            names.iter().zip(values).filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect();
        Value::Object(map)
    })
}

fn small_id() -> impl Strategy<Value = Value> {
    (0u64..5).prop_map(Value::from)
}

fn segmentation() -> impl Strategy<Value = Value> {
    let coords = vec((-10.0f64..40.0).prop_map(Value::from), 0..12).prop_map(Value::Array);
    let polygons = vec(coords, 0..3).prop_map(Value::Array);
    let size = vec((0u64..12).prop_map(Value::from), 0..3).prop_map(Value::Array);
    let counts = prop_oneof![
        vec((0u64..40).prop_map(Value::from), 0..8).prop_map(Value::Array),
        "[0-9A-Za-z\\[\\]\\\\`_^]{0,12}".prop_map(Value::from),
    ];
    let rle = object(vec![("size", field(size).boxed()), ("counts", field(counts).boxed())]);
    prop_oneof![polygons, rle]
}

/// A COCO document: mostly well-formed records with fields that are now and then wrong.
fn coco_doc() -> impl Strategy<Value = Value> {
    let image = object(vec![
        ("id", field(small_id()).boxed()),
        ("file_name", field("[a-z]{1,3}\\.png".prop_map(Value::from)).boxed()),
        ("width", field((0u64..12).prop_map(Value::from)).boxed()),
        ("height", field((0u64..12).prop_map(Value::from)).boxed()),
    ]);
    let bbox = vec((-5.0f64..20.0).prop_map(Value::from), 3..6).prop_map(Value::Array);
    let annotation = object(vec![
        ("id", field(small_id()).boxed()),
        ("image_id", field(small_id()).boxed()),
        ("category_id", field(small_id()).boxed()),
        ("bbox", field(bbox).boxed()),
        ("area", field(number()).boxed()),
        (
            "iscrowd",
            field(prop_oneof![(0u64..3).prop_map(Value::from), any::<bool>().prop_map(Value::from)]).boxed(),
        ),
        ("segmentation", field(segmentation()).boxed()),
    ]);
    let category = object(vec![
        ("id", field(small_id()).boxed()),
        ("name", field("[a-z]{0,3}".prop_map(Value::from)).boxed()),
    ]);
    object(vec![
        ("images", field(vec(image, 0..4).prop_map(Value::Array)).boxed()),
        ("annotations", field(vec(annotation, 0..6).prop_map(Value::Array)).boxed()),
        ("categories", field(vec(category, 0..4).prop_map(Value::Array)).boxed()),
    ])
}

/// Reads `text` as a COCO file with both class rules and rasterises every mask it accepts.
fn read_coco_text(text: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instances.json");
    std::fs::write(&path, text).unwrap();
    for rule in [ClassRule::LargestArea, ClassRule::Presence] {
        let Ok(dataset) = read_coco(&path, dir.path(), rule) else { continue };
        for sample in &dataset.samples {
            if let Some(MaskSource::Instances(inst)) = &sample.mask {
                if u64::from(inst.width) * u64::from(inst.height) <= 1 << 16 {
                    let mask = rasterise(inst).unwrap_or_default();
                    assert!(mask.is_empty() || mask.len() == (inst.width * inst.height) as usize);
                }
            }
        }
    }
}

/// A JSONL line: mostly objects with the manifest's fields, sometimes anything.
fn jsonl_line() -> impl Strategy<Value = String> {
    let boxes = vec(vec(number(), 3..7).prop_map(Value::Array), 0..3).prop_map(Value::Array);
    let record = object(vec![
        ("file", field("[a-z]{0,3}\\.png".prop_map(Value::from)).boxed()),
        ("id", field(small_id()).boxed()),
        ("class", field(number()).boxed()),
        ("boxes", field(boxes).boxed()),
        ("mask", field("[a-z]{0,3}\\.png".prop_map(Value::from)).boxed()),
    ]);
    prop_oneof![
        6 => record.prop_map(|v| v.to_string()),
        1 => json().prop_map(|v| v.to_string()),
        1 => ".{0,24}",
        1 => Just(String::new()),
    ]
}

fn dataset_json() -> impl Strategy<Value = Option<String>> {
    let names = vec("[a-z]{0,3}".prop_map(Value::from), 0..4).prop_map(Value::Array);
    let info = object(vec![
        ("class_names", field(names.clone()).boxed()),
        ("det_categories", field(names.clone()).boxed()),
        ("seg_classes", field(names).boxed()),
        ("multi_label", field(any::<bool>().prop_map(Value::from)).boxed()),
    ]);
    prop_oneof![2 => Just(None), 2 => info.prop_map(|v| Some(v.to_string())), 1 => ".{0,16}".prop_map(Some)]
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn coco_reader_answers_arbitrary_bytes(bytes in vec(any::<u8>(), 0..256)) {
        read_coco_text(&bytes);
    }

    #[test]
    fn coco_reader_answers_arbitrary_json(doc in json()) {
        read_coco_text(doc.to_string().as_bytes());
    }

    #[test]
    fn coco_reader_answers_documents_with_wrong_fields(doc in coco_doc()) {
        read_coco_text(doc.to_string().as_bytes());
    }

    #[test]
    fn jsonl_reader_answers_arbitrary_manifests(lines in vec(jsonl_line(), 0..6), info in dataset_json()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        if let Some(info) = info {
            std::fs::write(dir.path().join("dataset.json"), info).unwrap();
        }
        if let Ok(dataset) = read_manifest(&path) {
            let mut ids = BTreeMap::new();
            for s in &dataset.samples {
                prop_assert!(ids.insert(s.id, ()).is_none(), "ids are unique");
            }
        }
    }

    #[test]
    fn jsonl_reader_answers_arbitrary_bytes(bytes in vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(&path, bytes).unwrap();
        let _ = read_manifest(&path);
    }

    #[test]
    fn rle_strings_decode_or_error(
        text in prop_oneof![".{0,40}", "[0-o]{0,40}"],
        height in prop_oneof![0u32..24, any::<u32>()],
        width in prop_oneof![0u32..24, any::<u32>()],
    ) {
        if let Ok(rle) = Rle::from_compressed(&text, height, width) {
            let pixels = u64::from(height) * u64::from(width);
            prop_assert_eq!(rle.counts.iter().map(|&c| u64::from(c)).sum::<u64>(), pixels);
            prop_assert!(rle.area() <= pixels);
            if pixels <= 1 << 12 {
                let mut out = vec![0u8; pixels as usize];
                rle.paint(&mut out, 1);
                prop_assert_eq!(out.iter().filter(|&&v| v == 1).count() as u64, rle.area());
            }
        }
    }

    #[test]
    fn rle_counts_cover_the_image_or_error(
        counts in vec(prop_oneof![0u32..40, any::<u32>()], 0..12),
        height in prop_oneof![0u32..24, any::<u32>()],
        width in prop_oneof![0u32..24, any::<u32>()],
    ) {
        if let Ok(rle) = Rle::new(height, width, counts) {
            let pixels = u64::from(height) * u64::from(width);
            if pixels <= 1 << 12 {
                let mut out = vec![0u8; pixels as usize];
                rle.paint(&mut out, 7);
                prop_assert_eq!(out.iter().filter(|&&v| v == 7).count() as u64, rle.area());
            }
        }
    }

    #[test]
    fn polygons_rasterise_inside_the_image_or_error(
        polygons in vec(vec(prop_oneof![8 => -10.0f64..40.0, 1 => any::<f64>()], 0..14), 0..3),
        height in prop_oneof![4 => 0u32..32, 1 => any::<u32>()],
        width in prop_oneof![4 => 0u32..32, 1 => any::<u32>()],
    ) {
        let pixels = u64::from(height) * u64::from(width);
        for xy in &polygons {
            if let Ok(rle) = Rle::from_polygon(xy, height, width) {
                prop_assert_eq!(rle.counts.iter().map(|&c| u64::from(c)).sum::<u64>(), pixels);
            }
        }
        if pixels <= 1 << 12 {
            let mut out = vec![0u8; pixels as usize];
            let _ = Segmentation::Polygons(polygons).paint(&mut out, height, width, 3);
        }
    }
}
