use std::sync::Arc;

use super::*;
use crate::data::batch::ClassTarget;
use crate::data::jsonl::read_manifest;
use crate::data::synthetic::{generate, SyntheticConfig, SyntheticPreset};
use crate::data::testutil::{mask_png, png, text};

fn cfg(batch_size: usize, threads: usize, augment: AugmentConfig) -> LoaderConfig {
    LoaderConfig { batch_size, threads, prefetch_batches: 2, augment, seed: 5, epoch: 1 }
}

fn bools(t: &tch::Tensor) -> Vec<bool> {
    Vec::<bool>::try_from(t).unwrap()
}

#[test]
fn partial_labels_set_the_labelled_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, tone) in [("a.png", 10), ("b.png", 20), ("c.png", 30), ("d.png", 40)] {
        png(d, name, 24, 20, tone);
    }
    mask_png(d, "c_mask.png", (24, 20), [4, 4, 12, 10], 2);
    let manifest = text(
        d,
        "m.jsonl",
        concat!(
            "{\"file\": \"a.png\", \"class\": 1}\n",
            "{\"file\": \"b.png\", \"boxes\": [[2, 2, 8, 6, 0]]}\n",
            "{\"file\": \"c.png\", \"mask\": \"c_mask.png\"}\n",
            "{\"file\": \"d.png\", \"boxes\": []}\n"
        ),
    );
    let ds = Arc::new(read_manifest(&manifest).unwrap());
    let mut loader = Loader::new(ds, &[0, 1, 2, 3], cfg(4, 2, AugmentConfig::eval(16))).unwrap();
    let batch = loader.next().unwrap().unwrap();
    assert!(loader.next().is_none());
    assert_eq!(batch.ids, vec![0, 1, 2, 3]);
    assert_eq!(batch.images.size(), vec![4, 3, 16, 16]);
    let ClassTarget::Single(classes) = &batch.class_target else { panic!("single-label") };
    assert_eq!(Vec::<i64>::try_from(classes).unwrap(), vec![1, -1, -1, -1]);
    assert_eq!(bools(&batch.class_labelled), vec![true, false, false, false]);
    assert_eq!(batch.boxes_labelled, vec![false, true, false, true]);
    assert_eq!(batch.boxes.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 1, 0, 0]);
    assert_eq!(bools(&batch.mask_labelled), vec![false, false, true, false]);
    let masks = Vec::<i64>::try_from(batch.mask_target.flatten(0, -1)).unwrap();
    let (m0, m2) = (&masks[..256], &masks[512..768]);
    assert!(m0.iter().all(|&v| v == 255), "unlabelled mask is all ignore");
    assert!(
        m2.contains(&2) && m2.contains(&0) && m2.contains(&255),
        "labelled mask: class, background, padding"
    );
    // Eval letterbox 24×20 → 16×13.33: corners (2, 2, 10, 8) scaled by 2/3, shifted down 4/3.
    let b = batch.boxes[1][0];
    let want = [4.0 / 3.0, 8.0 / 3.0, 20.0 / 3.0, 20.0 / 3.0];
    for (got, want) in [b.x1, b.y1, b.x2, b.y2].into_iter().zip(want) {
        assert!((got - want).abs() < 1e-4, "{b:?}");
    }
    assert!(loader.summary().skipped.is_empty());
}

#[test]
fn corrupt_and_missing_images_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "good0.png", 16, 16, 1);
    png(d, "good1.png", 16, 16, 2);
    text(d, "corrupt.png", "not a png at all");
    text(d, "bad_mask.png", "also not a png");
    png(d, "good2.png", 16, 16, 3);
    let manifest = text(
        d,
        "m.jsonl",
        concat!(
            "{\"file\": \"good0.png\", \"class\": 0}\n",
            "{\"file\": \"corrupt.png\", \"class\": 0}\n",
            "{\"file\": \"missing.png\", \"class\": 0}\n",
            "{\"file\": \"good1.png\", \"class\": 0}\n",
            "{\"file\": \"good2.png\", \"mask\": \"bad_mask.png\"}\n",
            "{\"file\": \"missing2.png\"}\n"
        ),
    );
    let ds = Arc::new(read_manifest(&manifest).unwrap());
    let loader = Loader::new(ds, &[0, 1, 2, 3, 4, 5], cfg(4, 2, AugmentConfig::eval(16))).unwrap();
    let mut loader = loader;
    let first = loader.next().unwrap().unwrap();
    assert_eq!(first.ids, vec![0, 3]);
    assert_eq!(first.images.size(), vec![2, 3, 16, 16]);
    let second = loader.next().unwrap().unwrap();
    assert!(second.ids.is_empty(), "a chunk with nothing left is an empty batch");
    assert_eq!(second.images.size(), vec![0, 3, 16, 16]);
    let skipped = &loader.summary().skipped;
    assert_eq!(skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 4, 5]);
    assert_eq!(skipped[0].1, d.join("corrupt.png"));
    assert!(skipped[1].2.contains("cannot read image"), "{:?}", skipped[1]);
    assert!(skipped[2].2.contains("bad_mask.png"), "{:?}", skipped[2]);
}

#[test]
fn batches_do_not_depend_on_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    generate(
        dir.path(),
        &SyntheticConfig { n: 13, size: 32, seed: 3, val_fraction: 0.0, preset: SyntheticPreset::Standard },
    )
    .unwrap();
    let ds = Arc::new(read_manifest(&dir.path().join("train.jsonl")).unwrap());
    let shard = [7, 2, 11, 0, 12, 5, 9, 1, 3, 10, 4];
    let params = mtl_job::AugmentSection {
        hflip_prob: 0.5,
        scale_min: 0.7,
        scale_max: 1.4,
        brightness: 0.3,
        contrast: 0.3,
        saturation: 0.3,
    };
    let augment = AugmentConfig { random: true, params, ..AugmentConfig::eval(24) };
    let run = |threads: usize, epoch: u64| -> Vec<Batch> {
        let c = LoaderConfig { epoch, ..cfg(4, threads, augment.clone()) };
        Loader::new(ds.clone(), &shard, c).unwrap().map(Result::unwrap).collect()
    };
    let (one, three) = (run(1, 0), run(3, 0));
    assert_eq!(one.len(), 3);
    assert_eq!(
        one.iter().map(|b| b.ids.clone()).collect::<Vec<_>>(),
        vec![vec![7, 2, 11, 0], vec![12, 5, 9, 1], vec![3, 10, 4]]
    );
    for (a, b) in one.iter().zip(&three) {
        assert_eq!(a.ids, b.ids);
        assert!(a.images.equal(&b.images), "images differ");
        assert!(a.mask_target.equal(&b.mask_target), "masks differ");
        assert_eq!(a.boxes, b.boxes);
    }
    let other_epoch = run(2, 1);
    assert!(!one[0].images.equal(&other_epoch[0].images), "epoch is part of the key");
}

#[test]
fn unknown_ids_and_zero_sizes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = text(dir.path(), "m.jsonl", "{\"file\": \"a.png\"}\n");
    let ds = Arc::new(read_manifest(&manifest).unwrap());
    let err = Loader::new(ds.clone(), &[0, 9], cfg(2, 1, AugmentConfig::eval(16))).err().unwrap();
    assert!(err.to_string().contains("sample id 9"), "{err}");
    assert!(Loader::new(ds, &[0], cfg(0, 1, AugmentConfig::eval(16))).is_err());
}

/// Loader throughput (decode + augment + collate) on 128 px synthetic images; numbers go to
/// docs/PERFORMANCE.md. Run: `cargo test --release -p mtl-worker --lib loader_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run in release by hand"]
fn loader_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let n = 512;
    generate(
        dir.path(),
        &SyntheticConfig { n, size: 128, seed: 0, val_fraction: 0.0, preset: SyntheticPreset::Standard },
    )
    .unwrap();
    let ds = Arc::new(read_manifest(&dir.path().join("train.jsonl")).unwrap());
    let ids = ds.ids();
    let data = mtl_job::DataSection { image_size: 128, ..mtl_job::DataSection::default() };
    for threads in [1, 2] {
        for (mode, train) in [("train", true), ("eval", false)] {
            let mut best = 0.0f64;
            for epoch in 0..3 {
                let c = LoaderConfig {
                    threads,
                    prefetch_batches: 4,
                    ..LoaderConfig::from_section(&data, 32, train, 0, epoch)
                };
                let start = std::time::Instant::now();
                let images: usize =
                    Loader::new(ds.clone(), &ids, c).unwrap().map(|b| b.unwrap().ids.len()).sum();
                best = best.max(images as f64 / start.elapsed().as_secs_f64());
            }
            eprintln!("loader_throughput mode={mode} threads={threads} images_per_s={best:.0}");
        }
    }
}
