use mtl_job::{ClassRule, DataFormat, DataSection};

use super::*;
use crate::data::testutil::text;

#[test]
fn synthetic_is_generated_once_and_opened() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataSection {
        train: dir.path().join("shapes"),
        synthetic_n: 10,
        synthetic_size: 32,
        synthetic_val_fraction: 0.3,
        ..DataSection::default()
    };
    let train = open_dataset(&data, Split::Train, 4).unwrap().unwrap();
    let val = open_dataset(&data, Split::Val, 4).unwrap().unwrap();
    assert_eq!((train.samples.len(), val.samples.len()), (7, 3));
    assert_eq!(val.ids(), vec![7, 8, 9]);
    assert_eq!(train.info, synthetic::info());
    // A second open reuses the files (a different seed would otherwise change them).
    let before = std::fs::read(data.train.join("images/000000.png")).unwrap();
    open_dataset(&data, Split::Train, 99).unwrap();
    assert_eq!(std::fs::read(data.train.join("images/000000.png")).unwrap(), before);
    let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(leftovers, 1, "no partial directories left behind");
    // No validation images generated: no validation split.
    let data = DataSection { train: dir.path().join("no-val"), synthetic_val_fraction: 0.0, ..data };
    assert!(open_dataset(&data, Split::Val, 4).unwrap().is_none());
}

#[test]
fn coco_and_jsonl_splits() {
    let dir = tempfile::tempdir().unwrap();
    let coco = text(
        dir.path(),
        "train.json",
        r#"{"images": [{"id": 3, "file_name": "x.png", "width": 4, "height": 4}], "categories": [], "annotations": []}"#,
    );
    let data = DataSection {
        format: DataFormat::Coco,
        train: coco,
        class_rule: ClassRule::Presence,
        ..DataSection::default()
    };
    let ds = open_dataset(&data, Split::Train, 0).unwrap().unwrap();
    assert_eq!(ds.samples[0].image, dir.path().join("x.png"), "image_root defaults to the file's directory");
    assert!(open_dataset(&data, Split::Val, 0).unwrap().is_none(), "no val configured");
    let manifest = text(dir.path(), "m.jsonl", "{\"file\": \"a.png\"}\n");
    let data = DataSection {
        format: DataFormat::Jsonl,
        train: manifest.clone(),
        val: manifest,
        ..DataSection::default()
    };
    assert_eq!(open_dataset(&data, Split::Val, 0).unwrap().unwrap().samples.len(), 1);
}

#[test]
fn a_missing_image_root_and_an_empty_split_fail_at_open_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let coco = text(
        dir.path(),
        "train.json",
        r#"{"images": [{"id": 3, "file_name": "x.png", "width": 4, "height": 4}], "categories": [], "annotations": []}"#,
    );
    let data = DataSection {
        format: DataFormat::Coco,
        train: coco,
        image_root: dir.path().join("no-such-dir"),
        ..DataSection::default()
    };
    let err = open_dataset(&data, Split::Train, 0).unwrap_err().to_string();
    assert!(
        err.contains("`data.image_root`") && err.contains("no-such-dir") && err.contains("not a directory"),
        "{err}"
    );
    let data = DataSection { image_root: dir.path().to_owned(), ..data };
    open_dataset(&data, Split::Train, 0).unwrap();

    let empty = text(dir.path(), "empty.json", r#"{"images": [], "categories": [], "annotations": []}"#);
    let data = DataSection { train: empty.clone(), ..data };
    let err = open_dataset(&data, Split::Train, 0).unwrap_err().to_string();
    assert!(err.contains("`data.train`") && err.contains("empty.json has no samples"), "{err}");
    let manifest = text(dir.path(), "m.jsonl", "{\"file\": \"a.png\"}\n");
    let blank = text(dir.path(), "blank.jsonl", "\n");
    let data =
        DataSection { format: DataFormat::Jsonl, train: manifest, val: blank, ..DataSection::default() };
    let err = open_dataset(&data, Split::Val, 0).unwrap_err().to_string();
    assert!(err.contains("`data.val`") && err.contains("blank.jsonl has no samples"), "{err}");
}
