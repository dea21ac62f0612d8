use std::path::PathBuf;
use std::time::Duration;

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
    let cfg =
        SyntheticConfig { n: 6, size: 32, seed: 7, val_fraction: 0.34, preset: SyntheticPreset::Standard };
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
    generate(
        dir.path(),
        &SyntheticConfig { n: 40, size: 48, seed: 1, val_fraction: 0.0, preset: SyntheticPreset::Standard },
    )
    .unwrap();
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

#[test]
fn easy_preset_draws_fewer_larger_shapes() {
    let easy = SyntheticConfig { n: 60, size: 64, seed: 2, val_fraction: 0.0, preset: SyntheticPreset::Easy };
    let standard = SyntheticConfig { preset: SyntheticPreset::Standard, ..easy.clone() };
    // Per image: (number of boxes, side of the largest box).
    let scenes = |cfg: &SyntheticConfig| {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), cfg).unwrap();
        let ds = read_manifest(&dir.path().join("train.jsonl")).unwrap();
        let out: Vec<(usize, f64)> = ds
            .samples
            .iter()
            .map(|s| {
                let boxes = s.boxes.as_ref().unwrap();
                (boxes.len(), boxes.iter().map(|b| b.w.max(b.h)).fold(0.0, f64::max))
            })
            .collect();
        (out, files(dir.path()))
    };
    let ((easy, easy_files), (standard, standard_files)) = (scenes(&easy), scenes(&standard));
    assert!(easy.iter().all(|&(n, _)| (1..=2).contains(&n)), "1-2 shapes: {easy:?}");
    assert!(easy.iter().any(|&(n, _)| n == 2), "some images have a distractor");
    assert!(standard.iter().any(|&(n, _)| n == 3));
    // The large shape's radius is at least 24% of the side; borders clip it by at most 40%.
    assert!(easy.iter().all(|&(_, side)| side >= 0.24 * 64.0 * 1.2), "{easy:?}");
    let mean = |v: &[(usize, f64)]| v.iter().map(|&(_, side)| side).sum::<f64>() / v.len() as f64;
    assert!(mean(&easy) > 1.2 * mean(&standard), "{} vs {}", mean(&easy), mean(&standard));
    assert_ne!(easy_files, standard_files);
}

fn reference(cfg: &SyntheticConfig) -> (tempfile::TempDir, Vec<(PathBuf, Vec<u8>)>) {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), cfg).unwrap();
    let bytes = files(dir.path());
    (dir, bytes)
}

fn small() -> SyntheticConfig {
    SyntheticConfig { n: 24, size: 32, seed: 5, val_fraction: 0.25, preset: SyntheticPreset::Easy }
}

/// The names in `dir`'s parent: the dataset and nothing left behind (lock, partial directory).
fn siblings(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn concurrent_ensure_writes_one_dataset_identical_to_a_single_generation() {
    let cfg = small();
    let (_single, expected) = reference(&cfg);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("nested/shapes");
    let start = std::sync::Barrier::new(6);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    ensure(&dir, &cfg, Duration::from_secs(120))
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    });
    assert_eq!(files(&dir), expected);
    assert_eq!(siblings(&dir), ["shapes"]);
}

#[test]
fn a_crashed_writers_leftovers_are_never_taken_as_complete() {
    let cfg = small();
    let (_single, expected) = reference(&cfg);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("shapes");
    // A writer died mid-way: its partial directory (with a manifest but no dataset.json) and
    // its lock file are left; the lock itself went with the process.
    let partial = root.path().join("shapes.partial");
    std::fs::create_dir_all(partial.join("images")).unwrap();
    std::fs::write(partial.join("train.jsonl"), "{\"file\": \"images/000000.png\"}\n").unwrap();
    std::fs::write(root.path().join("shapes.lock"), "").unwrap();
    ensure(&dir, &cfg, Duration::from_secs(5)).unwrap();
    assert_eq!(files(&dir), expected);
    assert_eq!(siblings(&dir), ["shapes"]);

    // A directory written in place and interrupted (`gen-data` killed): refused, not used.
    let torn = root.path().join("torn");
    std::fs::create_dir_all(&torn).unwrap();
    std::fs::write(torn.join("train.jsonl"), "").unwrap();
    let err = ensure(&torn, &cfg, Duration::from_secs(5)).unwrap_err().to_string();
    assert!(err.contains("torn") && err.contains("no complete synthetic dataset"), "{err}");
    // An empty directory (made by hand) is filled, also when named with a trailing slash.
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    ensure(&root.path().join("empty/"), &cfg, Duration::from_secs(5)).unwrap();
    assert_eq!(files(&empty), expected);
    assert_eq!(siblings(&empty), ["empty", "shapes", "torn"]);
}

#[test]
fn waiting_for_a_live_writer_is_bounded_and_then_reuses_its_dataset() {
    let cfg = small();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("shapes");
    let lock_path = root.path().join("shapes.lock");
    let held = std::fs::File::create(&lock_path).unwrap();
    held.lock().unwrap();
    let err = ensure(&dir, &cfg, Duration::from_millis(50)).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("another process has been generating") && message.contains("shapes.lock"),
        "{message}"
    );
    assert!(!dir.exists(), "nothing written while another process holds the lock");

    // The holder finishes as a writer does: dataset renamed into place, lock file removed,
    // then unlocked. A waiter (before or after that) reuses it without generating again.
    std::thread::scope(|s| {
        let waiter = s.spawn(|| ensure(&dir, &cfg, Duration::from_secs(120)));
        let staged = root.path().join("staged");
        generate(&staged, &cfg).unwrap();
        std::fs::write(staged.join("written-by-the-holder"), "").unwrap();
        std::fs::rename(&staged, &dir).unwrap();
        std::fs::remove_file(&lock_path).unwrap();
        drop(held);
        waiter.join().unwrap().unwrap();
    });
    assert!(dir.join("written-by-the-holder").is_file(), "the holder's dataset was kept");
    assert_eq!(siblings(&dir), ["shapes"]);
}
