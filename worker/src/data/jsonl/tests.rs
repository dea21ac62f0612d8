use super::*;
use crate::data::testutil::text;

fn err_of(body: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = text(dir.path(), "m.jsonl", body);
    let err = read_manifest(&path).unwrap_err().to_string();
    assert!(err.contains("m.jsonl"), "names the file: {err}");
    err
}

#[test]
fn reads_partial_labels_and_resolves_paths() {
    let dir = tempfile::tempdir().unwrap();
    let body = concat!(
        r#"{"file": "a.png", "class": 2}"#,
        "\n\n",
        r#"{"file": "sub/b.png", "boxes": [[1, 2, 3.5, 4, 1]], "id": 40}"#,
        "\n",
        r#"{"file": "c.png", "mask": "m/c.png", "boxes": []}"#,
        "\n"
    );
    let ds = read_manifest(&text(dir.path(), "m.jsonl", body)).unwrap();
    assert_eq!(ds.ids(), vec![0, 40, 3]);
    let [a, b, c] = &ds.samples[..] else { panic!("three samples") };
    assert_eq!(a.image, dir.path().join("a.png"));
    assert_eq!(
        (a.class.clone(), a.boxes.is_none(), a.mask.is_none()),
        (Some(ClassLabel::Single(2)), true, true)
    );
    let want = BoxLabel { x: 1.0, y: 2.0, w: 3.5, h: 4.0, category: 1, iscrowd: false, area: 14.0 };
    assert_eq!((b.class.is_none(), b.boxes.as_deref()), (true, Some(&[want][..])));
    assert_eq!(c.boxes.as_deref(), Some(&[][..]));
    assert_eq!(c.mask, Some(MaskSource::Png(dir.path().join("m/c.png"))));
    // No dataset.json: label spaces numbered from the largest ids seen.
    assert_eq!(ds.info.class_names.len(), 3);
    assert_eq!(ds.info.det_categories.len(), 2);
    assert_eq!(ds.info.seg_classes, vec!["background", "category_0", "category_1"]);
}

#[test]
fn malformed_lines_are_named() {
    let e = err_of("{\"file\": \"a.png\"}\n{\"file\": \"b.png\", \n");
    assert!(e.contains("line 2") && e.contains("not JSON"), "{e}");
    let e = err_of(r#"{"file": "a.png", "boxes": [[1, 2, 3, 4]]}"#);
    assert!(e.contains("line 1, field `boxes[0]`") && e.contains("[x, y, w, h, category]"), "{e}");
    let e = err_of(r#"{"file": "a.png", "boxes": [[1, 2, "3", 4, 0]]}"#);
    assert!(e.contains("boxes[0]") && e.contains("element 2"), "{e}");
    let e = err_of("\n{\"file\": \"a.png\", \"class\": \"cat\"}");
    assert!(e.contains("line 2, field `class`") && e.contains("\"cat\""), "{e}");
    let e = err_of(r#"{"file": "a.png", "labels": 1}"#);
    assert!(e.contains("field `labels`") && e.contains("unknown field"), "{e}");
    let e = err_of(r#"{"class": 1}"#);
    assert!(e.contains("missing field `file`"), "{e}");
    let e = err_of("{\"file\": \"a.png\", \"id\": 5}\n{\"file\": \"b.png\", \"id\": 5}");
    assert!(e.contains("duplicate id 5"), "{e}");
}

#[test]
fn labels_beyond_dataset_json_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    text(
        dir.path(),
        INFO_FILE,
        r#"{"class_names": ["a", "b"], "det_categories": ["x"], "seg_classes": ["bg", "x"]}"#,
    );
    let ok = text(dir.path(), "ok.jsonl", r#"{"file": "a.png", "class": 1, "boxes": [[0, 0, 1, 1, 0]]}"#);
    let ds = read_manifest(&ok).unwrap();
    assert_eq!(ds.info.det_categories, vec![(0, "x".to_string())]);
    let bad = text(dir.path(), "bad.jsonl", "{\"file\": \"a.png\"}\n{\"file\": \"b.png\", \"class\": 2}");
    let e = read_manifest(&bad).unwrap_err().to_string();
    assert!(
        e.contains("bad.jsonl") && e.contains("record 2), field `class`") && e.contains("class 2"),
        "{e}"
    );
    let bad = text(dir.path(), "bad2.jsonl", r#"{"file": "a.png", "boxes": [[0, 0, 1, 1, 3]]}"#);
    let e = read_manifest(&bad).unwrap_err().to_string();
    assert!(e.contains("field `boxes`") && e.contains("category 3"), "{e}");
}
