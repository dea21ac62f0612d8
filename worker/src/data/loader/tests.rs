use std::sync::Arc;

use super::*;
use crate::data::batch::{network_images, ClassTarget, IMAGENET_MEAN, IMAGENET_STD};
use crate::data::jsonl::read_manifest;
use crate::data::synthetic::{generate, SyntheticConfig, SyntheticPreset};
use crate::data::testutil::{mask_png, png, text};
use crate::tasks::fcos_targets::FcosTargets;

fn cfg(batch_size: usize, threads: usize, augment: AugmentConfig) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        threads,
        prefetch_batches: 2,
        augment,
        seed: 5,
        epoch: 1,
        det_grid: None,
        pin_memory: false,
        cache_decoded: false,
    }
}

fn bools(t: &tch::Tensor) -> Vec<bool> {
    Vec::<bool>::try_from(t).unwrap()
}

/// The P3-P5 grid of the model for `side`-pixel square inputs.
fn grid(side: i64) -> [(i64, i64); 3] {
    crate::model::backbone::feature_sizes(side, side)
}

/// A synthetic training set of `n` 32 px images (in `dir`, which must outlive it).
fn synthetic(dir: &tempfile::TempDir, n: u32, seed: u64) -> Arc<Dataset> {
    let config = SyntheticConfig { n, size: 32, seed, val_fraction: 0.0, preset: SyntheticPreset::Standard };
    generate(dir.path(), &config).unwrap();
    Arc::new(read_manifest(&dir.path().join("train.jsonl")).unwrap())
}

/// Asserts two batches are equal in every field, detection targets and colour jitter included.
fn assert_same(a: &Batch, b: &Batch) {
    assert_eq!(a.ids, b.ids);
    assert!(a.images.equal(&b.images), "images differ");
    assert!(a.mask_target.equal(&b.mask_target), "masks differ");
    assert!(a.mask_labelled.equal(&b.mask_labelled));
    assert!(a.class_labelled.equal(&b.class_labelled));
    match (&a.class_target, &b.class_target) {
        (ClassTarget::Single(x), ClassTarget::Single(y)) | (ClassTarget::Multi(x), ClassTarget::Multi(y)) => {
            assert!(x.equal(y), "class targets differ");
        }
        _ => panic!("class target kinds differ"),
    }
    assert_eq!((&a.boxes, &a.boxes_labelled, &a.originals), (&b.boxes, &b.boxes_labelled, &b.originals));
    match (&a.det_targets, &b.det_targets) {
        (Some(x), Some(y)) => {
            assert!(x.labels.equal(&y.labels) && x.ltrb.equal(&y.ltrb) && x.labelled.equal(&y.labelled));
            assert_eq!((x.num_positives, x.sizes), (y.num_positives, y.sizes));
        }
        (None, None) => {}
        _ => panic!("detection targets on one side only"),
    }
    match (&a.colour_jitter, &b.colour_jitter) {
        (Some(x), Some(y)) => {
            assert!(x.factors.equal(&y.factors) && x.inside.equal(&y.inside), "jitter differs")
        }
        (None, None) => {}
        _ => panic!("colour jitter on one side only"),
    }
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
    assert_eq!((batch.images.kind(), batch.mask_target.kind()), (tch::Kind::Uint8, tch::Kind::Uint8));
    let masks = Vec::<u8>::try_from(batch.mask_target.flatten(0, -1)).unwrap();
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
    let ds = synthetic(&dir, 13, 3);
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
        let c = LoaderConfig { epoch, det_grid: Some(grid(24)), ..cfg(4, threads, augment.clone()) };
        Loader::new(ds.clone(), &shard, c).unwrap().map(Result::unwrap).collect()
    };
    let (one, three) = (run(1, 0), run(3, 0));
    assert_eq!(one.len(), 3);
    assert_eq!(
        one.iter().map(|b| b.ids.clone()).collect::<Vec<_>>(),
        vec![vec![7, 2, 11, 0], vec![12, 5, 9, 1], vec![3, 10, 4]]
    );
    for (a, b) in one.iter().zip(&three) {
        assert_same(a, b);
        // The loader thread's targets are those the step would assign from the batch's boxes.
        let t = a.det_targets.as_ref().unwrap();
        let want = FcosTargets::new(&a.boxes, &a.boxes_labelled, &grid(24)).unwrap();
        assert!(t.labels.equal(&want.labels) && t.ltrb.equal(&want.ltrb) && t.labelled.equal(&want.labelled));
        assert_eq!((t.num_positives, t.sizes), (want.num_positives, want.sizes));
    }
    assert!(one.iter().any(|b| b.det_targets.as_ref().unwrap().num_positives > 0));
    let other_epoch = run(2, 1);
    assert!(!one[0].images.equal(&other_epoch[0].images), "epoch is part of the key");
}

/// A shard loaded on a pool kept across epochs (as training does) gives the batches of a
/// loader with its own threads; a loader dropped half-way leaves the pool working.
#[test]
fn a_pool_serves_loader_after_loader_with_the_same_batches() {
    let dir = tempfile::tempdir().unwrap();
    let ds = synthetic(&dir, 10, 4);
    let shard = [9, 3, 0, 5, 7, 1, 8, 2, 6, 4];
    let mut augment = AugmentConfig { random: true, ..AugmentConfig::eval(24) };
    (augment.params.hflip_prob, augment.params.scale_min, augment.params.contrast) = (0.5, 0.8, 0.2);
    let c = |epoch| LoaderConfig { epoch, det_grid: Some(grid(24)), ..cfg(3, 2, augment.clone()) };
    let pool = LoaderPool::new(2).unwrap();
    let mut abandoned = Loader::on(&pool, ds.clone(), &shard, c(0)).unwrap();
    assert_eq!(abandoned.next().unwrap().unwrap().ids, vec![9, 3, 0]);
    drop(abandoned);
    for epoch in 0..3 {
        let pooled: Vec<Batch> =
            Loader::on(&pool, ds.clone(), &shard, c(epoch)).unwrap().map(Result::unwrap).collect();
        let own: Vec<Batch> =
            Loader::new(ds.clone(), &shard, c(epoch)).unwrap().map(Result::unwrap).collect();
        assert_eq!(pooled.len(), 4);
        for (a, b) in pooled.iter().zip(&own) {
            assert_same(a, b);
        }
    }
    assert_eq!(pool.threads(), 2);
}

/// The threads take samples, not batches: while one thread waits on a sample's file (a FIFO
/// that nothing has written yet), the other prepares the rest of the same batch; the batch
/// comes out whole, in shard order, once the file arrives.
#[test]
fn one_slow_sample_does_not_hold_up_the_rest_of_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, tone) in [("a.png", 10), ("b.png", 90), ("c.png", 170), ("slow_source.png", 250)] {
        png(d, name, 20, 16, tone);
    }
    let fifo = d.join("slow.png");
    let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
    let manifest = text(
        d,
        "m.jsonl",
        concat!(
            "{\"file\": \"slow.png\", \"class\": 0}\n",
            "{\"file\": \"a.png\", \"class\": 1}\n",
            "{\"file\": \"b.png\", \"class\": 2}\n",
            "{\"file\": \"c.png\", \"class\": 3}\n"
        ),
    );
    let ds = Arc::new(read_manifest(&manifest).unwrap());
    let c = LoaderConfig { prefetch_batches: 1, cache_decoded: true, ..cfg(4, 2, AugmentConfig::eval(16)) };
    let mut loader = Loader::new(ds.clone(), &[0, 1, 2, 3], c).unwrap();
    let feed = || std::fs::write(&fifo, std::fs::read(d.join("slow_source.png")).unwrap()).unwrap();
    // Waits for the condition itself (the other samples decoded into the cache); the deadline
    // only turns a regression into a failure instead of a hang.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while ds.decoded.len() < 3 {
        if std::time::Instant::now() > deadline {
            feed();
            panic!("the other samples of the batch waited for the slow one");
        }
        std::thread::yield_now();
    }
    assert!(ds.decoded.get(0).is_none(), "the slow sample is still waiting for its file");
    feed();
    let batch = loader.next().unwrap().unwrap();
    assert_eq!(batch.ids, vec![0, 1, 2, 3]);
    let ClassTarget::Single(classes) = &batch.class_target else { panic!("single-label") };
    assert_eq!(Vec::<i64>::try_from(classes).unwrap(), vec![0, 1, 2, 3]);
    assert!(loader.next().is_none() && loader.summary().skipped.is_empty());
}

#[test]
fn a_panicking_job_leaves_its_pool_thread_working() {
    let pool = LoaderPool::new(1).unwrap();
    pool.submit(Box::new(|| panic!("a job that panics (expected in this test)")));
    let (tx, rx) = mpsc::channel();
    pool.submit(Box::new(move || tx.send(7).unwrap()));
    assert_eq!(rx.recv().unwrap(), 7);
    assert!(LoaderPool::new(0).is_err());
}

#[test]
fn the_decoded_cache_gives_the_same_batches_and_later_epochs_read_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, tone) in [("a.png", 10), ("b.png", 90), ("c.png", 170)] {
        png(d, name, 28, 20, tone);
    }
    mask_png(d, "b_mask.png", (28, 20), [4, 4, 20, 12], 1);
    text(d, "bad.png", "not a png");
    let manifest = text(
        d,
        "m.jsonl",
        concat!(
            "{\"file\": \"a.png\", \"class\": 1, \"boxes\": [[2, 2, 18, 12, 0]]}\n",
            "{\"file\": \"bad.png\", \"class\": 0}\n",
            "{\"file\": \"b.png\", \"mask\": \"b_mask.png\", \"boxes\": []}\n",
            "{\"file\": \"c.png\", \"class\": 2}\n"
        ),
    );
    let ds = Arc::new(read_manifest(&manifest).unwrap());
    let mut augment = AugmentConfig { random: true, ..AugmentConfig::eval(16) };
    (augment.params.hflip_prob, augment.params.brightness) = (0.5, 0.3);
    let run = |epoch: u64, cache_decoded: bool| {
        let c = LoaderConfig { epoch, cache_decoded, det_grid: Some(grid(16)), ..cfg(2, 2, augment.clone()) };
        let mut loader = Loader::new(ds.clone(), &[3, 1, 0, 2], c).unwrap();
        let batches: Vec<Batch> = loader.by_ref().map(Result::unwrap).collect();
        let skipped: Vec<u64> = loader.summary().skipped.iter().map(|s| s.0).collect();
        (batches, skipped)
    };
    let (plain, plain_skipped) = run(0, false);
    assert!(ds.decoded.is_empty(), "nothing cached without the option");
    let (cached, cached_skipped) = run(0, true);
    assert_eq!(ds.decoded.len(), 3, "the readable samples are cached, the corrupt one is not");
    assert_eq!((&plain_skipped, &cached_skipped), (&vec![1], &vec![1]));
    assert_eq!(plain.len(), 2);
    for (a, b) in plain.iter().zip(&cached) {
        assert_same(a, b);
    }
    let (next_plain, _) = run(1, false);
    for name in ["a.png", "b.png", "b_mask.png", "c.png"] {
        std::fs::remove_file(d.join(name)).unwrap();
    }
    // Epoch 1 from the cache: the same batches as decoding the files, which are gone now;
    // the corrupt image is tried, skipped and counted again.
    let (next_cached, next_skipped) = run(1, true);
    assert_eq!(next_skipped, vec![1]);
    for (a, b) in next_plain.iter().zip(&next_cached) {
        assert_same(a, b);
    }
    assert!(!next_plain[0].images.equal(&plain[0].images), "epoch 1 is augmented anew");
    let (_, without_files) = run(1, false);
    assert_eq!(without_files, vec![3, 1, 0, 2], "without the cache every file is missing");
}

/// The colour jitter of `image` (`3 × s × s` u8) by `j`, pixel by pixel on the host in grey
/// levels (the mean grey summed in f64): what `Batch::to_device` computes batched.
fn jitter_on_host(image: &[u8], s: usize, j: &crate::data::augment::Jitter) -> Vec<f32> {
    use crate::data::batch::GREY;
    let mut v: Vec<f32> = image.iter().map(|&q| f32::from(q)).collect();
    let [y0, y1, x0, x1] = j.inside.map(|v| v as usize);
    let [fb, fc, fs] = j.factors;
    let pixels: Vec<[usize; 3]> = (y0..y1)
        .flat_map(|y| (x0..x1).map(move |x| std::array::from_fn(|c| c * s * s + y * s + x)))
        .collect();
    let grey = |v: &[f32], p: &[usize; 3]| GREY[0] * v[p[0]] + GREY[1] * v[p[1]] + GREY[2] * v[p[2]];
    for &i in pixels.iter().flatten() {
        v[i] = (v[i] * fb).clamp(0.0, 255.0);
    }
    let mean =
        (pixels.iter().map(|p| f64::from(grey(&v, p))).sum::<f64>() / pixels.len().max(1) as f64) as f32;
    for p in &pixels {
        for &i in p {
            v[i] = ((v[i] - mean) * fc + mean).clamp(0.0, 255.0);
        }
        let g = grey(&v, p);
        for &i in p {
            v[i] = ((v[i] - g) * fs + g).clamp(0.0, 255.0);
        }
    }
    v
}

/// `Batch::to_device` applies each sample's colour jitter as the per-pixel host arithmetic
/// does (padding untouched), with no host read; batches without jitter carry none. Against
/// jitter in the loader (before quantisation, not after), the same batches up to rounding.
#[test]
fn the_device_applies_each_sample_s_colour_jitter() {
    let dir = tempfile::tempdir().unwrap();
    let ds = synthetic(&dir, 12, 8);
    let shard: Vec<u64> = ds.ids();
    let params = mtl_job::AugmentSection {
        hflip_prob: 0.5,
        scale_min: 0.6,
        scale_max: 1.5,
        brightness: 0.4,
        contrast: 0.4,
        saturation: 0.4,
    };
    let augment = AugmentConfig { random: true, params, jitter_on_device: true, ..AugmentConfig::eval(24) };
    let load = |augment: AugmentConfig| -> Vec<Batch> {
        let c = LoaderConfig { det_grid: Some(grid(24)), ..cfg(4, 2, augment) };
        Loader::new(ds.clone(), &shard, c).unwrap().map(Result::unwrap).collect()
    };
    let batches = load(augment.clone());
    let in_loader = load(AugmentConfig { jitter_on_device: false, ..augment.clone() });
    let (mut worst, mut moved) = (0.0f32, 0.0f64);
    let (mut padded, mut rounding_worst, mut rounding_sum) = (0, 0.0f32, 0.0f64);
    for (batch, host) in batches.iter().zip(&in_loader) {
        let jitter = batch.colour_jitter.as_ref().expect("every sample jitters");
        let factors = Vec::<f32>::try_from(jitter.factors.flatten(0, -1)).unwrap();
        let inside = Vec::<i64>::try_from(jitter.inside.flatten(0, -1)).unwrap();
        let (on_device, counts) = crate::op_count::count_ops(|| batch.to_device(tch::Device::Cpu).unwrap());
        assert_eq!(counts.host_reads(), vec![], "the jitter reads nothing from the device");
        assert!(on_device.colour_jitter.is_none(), "applied by to_device");
        assert!(host.colour_jitter.is_none(), "applied in the loader");
        let host = host.to_device(tch::Device::Cpu).unwrap();
        let mut same_but_images = on_device.to_device(tch::Device::Cpu).unwrap();
        same_but_images.images = host.images.shallow_clone();
        assert_same(&host, &same_but_images);
        let got = Vec::<f32>::try_from(on_device.images.flatten(0, -1)).unwrap();
        let in_loader = Vec::<f32>::try_from(host.images.flatten(0, -1)).unwrap();
        let images = Vec::<u8>::try_from(batch.images.flatten(0, -1)).unwrap();
        for (i, image) in images.chunks(3 * 24 * 24).enumerate() {
            let j = crate::data::augment::Jitter {
                factors: factors[3 * i..3 * i + 3].try_into().unwrap(),
                inside: inside[4 * i..4 * i + 4].try_into().unwrap(),
            };
            padded += usize::from(j.inside != [0, 24, 0, 24]);
            let want = jitter_on_host(image, 24, &j);
            for (p, (&w, &q)) in want.iter().zip(image).enumerate() {
                let c = p / (24 * 24);
                let normalised = |v: f32| (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                let g = got[i * 3 * 24 * 24 + p];
                worst = worst.max((g - normalised(w)).abs());
                let levels = (g - in_loader[i * 3 * 24 * 24 + p]).abs() * 255.0 * IMAGENET_STD[c];
                (rounding_worst, rounding_sum) =
                    (rounding_worst.max(levels), rounding_sum + f64::from(levels));
                moved += f64::from((w - f32::from(q)).abs());
            }
        }
    }
    assert!(worst < 1e-4, "device and host jitter differ by {worst}");
    // The loader jitters the bilinear values and rounds once; the device jitters the rounded
    // ones: at most half a grey level, scaled by the factors.
    let rounding_mean = rounding_sum / (12.0 * 3.0 * 24.0 * 24.0);
    assert!(rounding_worst <= 3.0 && rounding_mean <= 0.5, "{rounding_worst} / {rounding_mean} grey levels");
    assert!(padded > 0, "some samples have padding the jitter must leave alone");
    assert!(moved / (12.0 * 3.0 * 24.0 * 24.0) > 5.0, "the jitter changes colours: {moved}");
    let eval = LoaderConfig { augment: AugmentConfig::eval(24), ..cfg(4, 1, augment) };
    assert!(Loader::new(ds, &shard, eval).unwrap().all(|b| b.unwrap().colour_jitter.is_none()));
}

#[test]
fn to_device_normalises_u8_images_and_widens_masks() {
    let dir = tempfile::tempdir().unwrap();
    png(dir.path(), "a.png", 16, 16, 200);
    mask_png(dir.path(), "m.png", (16, 16), [0, 0, 8, 8], 2);
    let manifest = text(dir.path(), "m.jsonl", "{\"file\": \"a.png\", \"mask\": \"m.png\"}\n");
    let ds = Arc::new(read_manifest(&manifest).unwrap());
    let batch = Loader::new(ds, &[0], cfg(1, 1, AugmentConfig::eval(16))).unwrap().next().unwrap().unwrap();
    let on_device = batch.to_device(tch::Device::Cpu).unwrap();
    assert_eq!(on_device.images.kind(), tch::Kind::Float);
    let pixels = Vec::<u8>::try_from(batch.images.flatten(0, -1)).unwrap();
    let normalised = Vec::<f32>::try_from(on_device.images.flatten(0, -1)).unwrap();
    for (i, (&q, &x)) in pixels.iter().zip(&normalised).enumerate() {
        let c = i / 256;
        let want = (f32::from(q) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        assert!((x - want).abs() < 1e-5, "value {i}: {x} vs {want}");
    }
    assert_eq!(on_device.mask_target.kind(), tch::Kind::Int64);
    let widened = Vec::<i64>::try_from(on_device.mask_target.flatten(0, -1)).unwrap();
    let masks = Vec::<u8>::try_from(batch.mask_target.flatten(0, -1)).unwrap();
    assert_eq!(widened, masks.iter().map(|&v| i64::from(v)).collect::<Vec<_>>());
    assert!(widened.contains(&2) && widened.contains(&0));
    // A batch already in the network's form is only moved: to_device is idempotent.
    let again = on_device.to_device(tch::Device::Cpu).unwrap();
    assert!(again.images.equal(&on_device.images) && again.mask_target.equal(&on_device.mask_target));
    assert!(network_images(&on_device.images, tch::Device::Cpu).unwrap().equal(&on_device.images));
}

#[test]
fn pinned_batches_when_asked_and_an_error_without_cuda() {
    let dir = tempfile::tempdir().unwrap();
    png(dir.path(), "a.png", 16, 16, 7);
    let manifest = text(dir.path(), "m.jsonl", "{\"file\": \"a.png\", \"boxes\": [[1, 1, 9, 9, 0]]}\n");
    let ds = Arc::new(read_manifest(&manifest).unwrap());
    let c = LoaderConfig { pin_memory: true, det_grid: Some(grid(16)), ..cfg(1, 1, AugmentConfig::eval(16)) };
    let batch = Loader::new(ds.clone(), &[0], c).unwrap().next().unwrap();
    if tch::Cuda::is_available() {
        let batch = batch.unwrap();
        let cuda = tch::Device::Cuda(0);
        assert!(batch.images.is_pinned(cuda) && batch.mask_target.is_pinned(cuda));
        assert!(batch.det_targets.as_ref().unwrap().labels.is_pinned(cuda));
        let plain =
            Loader::new(ds, &[0], cfg(1, 1, AugmentConfig::eval(16))).unwrap().next().unwrap().unwrap();
        assert!(batch.images.equal(&plain.images) && batch.mask_target.equal(&plain.mask_target));
        let on_gpu = batch.to_device(cuda).unwrap();
        let on_cpu = plain.to_device(tch::Device::Cpu).unwrap();
        let diff = (on_gpu.images.to_device(tch::Device::Cpu) - &on_cpu.images).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
    } else {
        let err = batch.err().unwrap().to_string();
        assert!(err.contains("pinned host memory"), "{err}");
    }
}

#[test]
fn for_training_gives_the_model_s_grid_and_pins_only_for_a_gpu() {
    use crate::tasks::tests::test_model;
    use mtl_job::TasksSection;
    let data =
        mtl_job::DataSection { image_size: 96, cache_decoded: true, ..mtl_job::DataSection::default() };
    let base = LoaderConfig::from_section(&data, 4, true, 0, 0);
    assert_eq!((base.det_grid, base.pin_memory, base.cache_decoded), (None, false, true));
    let model = test_model(&TasksSection::default());
    let c = base.clone().for_training(&model);
    assert_eq!(c.det_grid, Some(model.feature_sizes(96, 96)));
    assert!(!c.pin_memory && !c.augment.jitter_on_device, "the model is on the CPU");
    let no_detection = test_model(&TasksSection { detection: false, ..TasksSection::default() });
    assert_eq!(base.for_training(&no_detection).det_grid, None);
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
        for (mode, train, targets) in
            [("train", true, false), ("train+fcos", true, true), ("eval", false, false)]
        {
            let (mut best, mut first) = (0.0f64, f64::INFINITY);
            for epoch in 0..3 {
                let c = LoaderConfig {
                    threads,
                    prefetch_batches: 4,
                    det_grid: targets.then(|| grid(128)),
                    ..LoaderConfig::from_section(&data, 32, train, 0, epoch)
                };
                let start = std::time::Instant::now();
                let mut loader = Loader::new(ds.clone(), &ids, c).unwrap();
                let mut images = loader.next().unwrap().unwrap().ids.len();
                first = first.min(start.elapsed().as_secs_f64() * 1e3);
                images += loader.map(|b| b.unwrap().ids.len()).sum::<usize>();
                best = best.max(images as f64 / start.elapsed().as_secs_f64());
            }
            eprintln!("loader_throughput mode={mode} threads={threads} images_per_s={best:.0} first_batch_ms={first:.1}");
        }
    }
}
