use super::*;
use crate::data::jsonl::read_manifest;
use crate::data::sample::{ClassLabel, MaskSource};

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.strip_prefix(dir).unwrap().to_owned(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn same_seed_same_bytes() {
    let cfg = SyntheticConfig { n: 6, size: 32, seed: 7, val_fraction: 0.34 };
    let (a, b, c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    generate(a.path(), &cfg).unwrap();
    generate(b.path(), &cfg).unwrap();
    generate(c.path(), &SyntheticConfig { seed: 8, ..cfg }).unwrap();
    let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
    assert_eq!(fa.len(), 6 * 2 + 3, "images, masks, train/val manifests, dataset.json");
    assert_eq!(fa, fb);
    assert_ne!(fa, fc);
    let val = std::fs::read_to_string(a.path().join("val.jsonl")).unwrap();
    assert_eq!(val.lines().count(), 2);
}

#[test]
fn labels_agree_with_the_mask() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), &SyntheticConfig { n: 40, size: 48, seed: 1, val_fraction: 0.0 }).unwrap();
    let ds = read_manifest(&dir.path().join("train.jsonl")).unwrap();
    assert_eq!(ds.info, info());
    let (mut multi, mut classes) = (0, [0; 5]);
    for s in &ds.samples {
        let Some(MaskSource::Png(path)) = &s.mask else { panic!("mask") };
        let m = image::open(path).unwrap().to_luma8();
        let boxes = s.boxes.as_ref().unwrap();
        multi += usize::from(boxes.len() > 1);
        let mut counts = [0usize; 6];
        for (x, y, p) in m.enumerate_pixels() {
            let v = p.0[0];
            if (1..=5).contains(&v) {
                counts[v as usize] += 1;
                let (fx, fy) = (f64::from(x), f64::from(y));
                let covered = boxes.iter().any(|b| {
                    b.category + 1 == u32::from(v)
                        && fx >= b.x
                        && fy >= b.y
                        && fx < b.x + b.w
                        && fy < b.y + b.h
                });
                assert!(covered, "sample {}: pixel ({x},{y}) of class {v} outside its boxes", s.id);
            } else {
                assert!(v == 0 || v == 255);
            }
        }
        let Some(ClassLabel::Single(c)) = s.class else { panic!("class") };
        classes[c as usize] += 1;
        let best = (1..=5).max_by_key(|&v| (counts[v], std::cmp::Reverse(v))).unwrap();
        assert_eq!(c as usize + 1, best, "sample {}: class is the largest visible area", s.id);
    }
    assert!(multi > 10, "{multi} images with several shapes");
    assert!(classes.iter().all(|&n| n > 0), "every class occurs: {classes:?}");
}
