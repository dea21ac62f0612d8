use super::*;

const RED: [u8; 3] = [200, 30, 40];

/// A 40×30 textured image with a filled red rectangle at x 10..26, y 5..20 (class 1).
fn scene() -> (RgbImage, Vec<u8>, BoxLabel) {
    let mut rng = Rng::from_key(&[99]);
    let mut img = RgbImage::new(40, 30);
    let mut mask = vec![0u8; 40 * 30];
    for (x, y, p) in img.enumerate_pixels_mut() {
        let inside = (10..26).contains(&x) && (5..20).contains(&y);
        *p = if inside {
            mask[(y * 40 + x) as usize] = 1;
            image::Rgb(RED)
        } else {
            image::Rgb([(rng.below(60) + 20) as u8, (rng.below(60) + 100) as u8, (rng.below(60) + 120) as u8])
        };
    }
    let b = BoxLabel { x: 10.0, y: 5.0, w: 16.0, h: 15.0, category: 0, iscrowd: false, area: 240.0 };
    (img, mask, b)
}

fn no_jitter(size: u32) -> AugmentConfig {
    let eval = AugmentConfig::eval(size);
    AugmentConfig {
        params: AugmentSection { scale_min: 0.6, scale_max: 1.8, hflip_prob: 0.5, ..eval.params.clone() },
        ..eval
    }
}

/// `cfg` with the same brightness, contrast and saturation jitter `amount`.
fn with_jitter(mut cfg: AugmentConfig, amount: f64) -> AugmentConfig {
    (cfg.params.brightness, cfg.params.contrast, cfg.params.saturation) = (amount, amount, amount);
    cfg
}

fn rgb_at(a: &Augmented, s: usize, p: usize) -> [f32; 3] {
    std::array::from_fn(|c| f32::from(a.image[c * s * s + p]))
}

#[test]
fn image_mask_and_box_stay_aligned() {
    let (img, mask, b) = scene();
    let s = 32usize;
    let cfg = AugmentConfig { random: true, ..no_jitter(s as u32) };
    let (mut flips, mut clipped, mut kept) = (0, 0, 0);
    for seed in 0..200u64 {
        let a = augment(&img, &[b], Some(&mask), &cfg, [seed, 3, 17]);
        let m = a.mask.as_ref().unwrap();
        let pixels: Vec<(usize, usize)> = (0..s * s).filter(|&p| m[p] == 1).map(|p| (p % s, p / s)).collect();
        let Some(gt) = a.boxes.first() else {
            assert!(pixels.len() < 3 * s, "seed {seed}: box dropped but {} mask pixels", pixels.len());
            continue;
        };
        kept += 1;
        let x1 = pixels.iter().map(|p| p.0).min().unwrap() as f32;
        let x2 = pixels.iter().map(|p| p.0).max().unwrap() as f32 + 1.0;
        let y1 = pixels.iter().map(|p| p.1).min().unwrap() as f32;
        let y2 = pixels.iter().map(|p| p.1).max().unwrap() as f32 + 1.0;
        for (got, want) in [(gt.x1, x1), (gt.x2, x2), (gt.y1, y1), (gt.y2, y2)] {
            assert!((got - want).abs() <= 1.0, "seed {seed}: box {gt:?} vs mask bbox {:?}", (x1, y1, x2, y2));
        }
        if gt.x1 == 0.0 || gt.y1 == 0.0 || gt.x2 == s as f32 || gt.y2 == s as f32 {
            clipped += 1;
        }
        // Interior mask pixels carry the rectangle's colour (no jitter here).
        for &(x, y) in &pixels {
            let interior = x > 0
                && y > 0
                && x + 1 < s
                && y + 1 < s
                && [m[y * s + x - 1], m[y * s + x + 1], m[(y - 1) * s + x], m[(y + 1) * s + x]] == [1; 4];
            if interior {
                let rgb = rgb_at(&a, s, y * s + x);
                for c in 0..3 {
                    assert!(
                        (rgb[c] - f32::from(RED[c])).abs() < 1.0,
                        "seed {seed}: pixel ({x},{y}) is {rgb:?}"
                    );
                }
            }
        }
        // Flipped iff the rectangle's centre moved to the right half of the source's extent.
        let a0 = augment(
            &img,
            &[b],
            Some(&mask),
            &AugmentConfig {
                params: AugmentSection { hflip_prob: 0.0, ..cfg.params.clone() },
                ..cfg.clone()
            },
            [seed, 3, 17],
        );
        if a0.boxes.first().is_some_and(|b0| (b0.x1 - gt.x1).abs() > 1.0) {
            flips += 1;
        }
    }
    assert!(kept > 150 && flips > 40 && clipped > 10, "kept {kept}, flips {flips}, clipped {clipped}");
}

#[test]
fn padding_is_ignored_and_the_mean_colour() {
    let (img, mask, b) = scene();
    let a = augment(&img, &[b], Some(&mask), &AugmentConfig::eval(32), [0, 0, 0]);
    // 40×30 letterboxed to 32: scale 0.8 → 32×24, centred: rows 0..4 and 28..32 are padding.
    let m = a.mask.unwrap();
    assert!(m[..4 * 32].iter().all(|&v| v == IGNORE_INDEX));
    assert!(m[28 * 32..].iter().all(|&v| v == IGNORE_INDEX));
    assert!(m[4 * 32..28 * 32].iter().all(|&v| v != IGNORE_INDEX));
    for c in 0..3 {
        let plane = &a.image[c * 32 * 32..(c + 1) * 32 * 32];
        assert!(plane[..4 * 32].iter().chain(&plane[28 * 32..]).all(|&v| v == PAD_RGB[c]));
        // Normalised on the device, the padding is within 0.01 of 0, as it was exactly 0 when
        // images were normalised here in f32.
        let normalised =
            (f32::from(PAD_RGB[c]) / 255.0 - IMAGENET_MEAN[c]) / crate::data::batch::IMAGENET_STD[c];
        assert!(normalised.abs() < 0.01, "channel {c}: {normalised}");
    }
    assert_eq!(PAD_RGB, [124, 116, 104]);
    let gt = a.boxes[0];
    assert_eq!((gt.x1, gt.y1, gt.x2, gt.y2), (8.0, 8.0, 20.8, 20.0));
}

#[test]
fn eval_is_deterministic_and_train_depends_only_on_key() {
    let (img, mask, b) = scene();
    let eval = AugmentConfig::eval(32);
    assert_eq!(
        augment(&img, &[b], Some(&mask), &eval, [1, 2, 3]),
        augment(&img, &[b], Some(&mask), &eval, [4, 5, 6])
    );
    let train = with_jitter(AugmentConfig { random: true, ..no_jitter(32) }, 0.4);
    let a = augment(&img, &[b], Some(&mask), &train, [1, 2, 3]);
    assert_eq!(a, augment(&img, &[b], Some(&mask), &train, [1, 2, 3]));
    assert_ne!(a, augment(&img, &[b], Some(&mask), &train, [1, 2, 4]));
}

#[test]
fn jitter_changes_colours_not_geometry() {
    let (img, mask, b) = scene();
    let plain = AugmentConfig { random: true, ..no_jitter(32) };
    let jittered = with_jitter(plain.clone(), 0.5);
    let a = augment(&img, &[b], Some(&mask), &plain, [5, 0, 9]);
    let j = augment(&img, &[b], Some(&mask), &jittered, [5, 0, 9]);
    assert_eq!((&a.boxes, &a.mask, a.jitter, j.jitter), (&j.boxes, &j.mask, None, None));
    assert_ne!(a.image, j.image);
}

/// Jitter left to the device is drawn here and changes nothing of the sample; its rectangle is
/// exactly the pixels inside the source image.
#[test]
fn jitter_left_to_the_device_is_carried_not_applied() {
    let (img, mask, b) = scene();
    let plain = AugmentConfig { random: true, jitter_on_device: true, ..no_jitter(32) };
    let jittered = with_jitter(plain.clone(), 0.5);
    for seed in 0..20u64 {
        let a = augment(&img, &[b], Some(&mask), &plain, [seed, 0, 9]);
        let d = augment(&img, &[b], Some(&mask), &jittered, [seed, 0, 9]);
        assert_eq!(a.jitter, None, "all factors 1: nothing to do");
        let j = d.jitter.expect("jitter drawn");
        assert_eq!((&a.image, &a.boxes, &a.mask), (&d.image, &d.boxes, &d.mask), "seed {seed}");
        assert!(j.factors.iter().all(|f| (0.5..=1.5).contains(f)) && j.factors != [1.0; 3]);
        let [y0, y1, x0, x1] = j.inside.map(|v| v as usize);
        let m = a.mask.as_ref().unwrap();
        for (p, &v) in m.iter().enumerate() {
            let (x, y) = (p % 32, p / 32);
            let inside = (y0..y1).contains(&y) && (x0..x1).contains(&x);
            assert_eq!(v == IGNORE_INDEX, !inside, "seed {seed} pixel {p}");
        }
    }
    assert_eq!(
        augment(&img, &[b], Some(&mask), &with_jitter(AugmentConfig::eval(32), 0.5), [1, 0, 9]).jitter,
        None
    );
}

#[test]
fn boxes_cropped_away_are_dropped() {
    let (img, _, _) = scene();
    // A box entirely left of the visible crop: scale 2 makes the 40-wide image 80 px wide
    // (longer side 40 → 32 * 2): a 2 px box at the right edge shows only for a few offsets.
    let mut cfg = AugmentConfig { random: true, ..no_jitter(32) };
    (cfg.params.scale_min, cfg.params.scale_max) = (2.0, 2.0);
    let far = BoxLabel { x: 38.0, y: 14.0, w: 2.0, h: 2.0, category: 1, iscrowd: false, area: 4.0 };
    let (mut dropped, mut kept) = (0, 0);
    for seed in 0..200 {
        let a = augment(&img, &[far], None, &cfg, [seed, 0, 0]);
        assert!(a.mask.is_none());
        match a.boxes.first() {
            None => dropped += 1,
            Some(g) => {
                assert!(g.x2 - g.x1 >= 1.0 && g.x2 <= 32.0 && g.x1 >= 0.0);
                kept += 1;
            }
        }
    }
    assert!(dropped > 10 && kept > 0, "dropped {dropped}, kept {kept}");
}

#[test]
fn letterbox_inverse_undoes_the_eval_transform() {
    // A 40×30 image in a 32 px square: the box the eval transform produces maps back onto the
    // annotated one, and a box in the padding maps to nothing.
    let (img, mask, b) = scene();
    let a = augment(&img, &[b], Some(&mask), &AugmentConfig::eval(32), [0, 0, 0]);
    let lb = Letterbox::new(32, 40, 30);
    assert_eq!((lb.k, lb.tx, lb.ty), (0.8, 0.0, 4.0));
    let g = a.boxes[0];
    let back = lb.original_box([g.x1, g.y1, g.x2, g.y2]).unwrap();
    for (got, want) in back.iter().zip([b.x, b.y, b.x + b.w, b.y + b.h]) {
        assert!((got - want).abs() < 1e-5, "{back:?}");
    }
    assert_eq!(lb.original_box([0.0, 0.0, 32.0, 2.0]), None, "inside the top padding");
    assert_eq!(lb.original_box([-4.0, 2.0, 40.0, 40.0]), Some([0.0, 0.0, 40.0, 30.0]), "clipped");
}

#[test]
fn quantisation_rounds_to_the_nearest_grey_level_and_keeps_exact_ones() {
    for q in 0..=255u8 {
        assert_eq!(quantise(f32::from(q) / 255.0), q);
    }
    assert_eq!((quantise(0.0), quantise(1.0), quantise(0.5)), (0, 255, 128));
    assert_eq!((quantise(10.49 / 255.0), quantise(10.51 / 255.0)), (10, 11));
    // Without interpolation (a square image at its own size) the pixels come back unchanged.
    let (img, _, _) = scene();
    let square = image::imageops::crop_imm(&img, 0, 0, 30, 30).to_image();
    let a = augment(&square, &[], None, &AugmentConfig::eval(30), [0, 0, 0]);
    for (p, px) in square.pixels().enumerate() {
        assert_eq!(rgb_at(&a, 30, p), px.0.map(f32::from), "pixel {p}");
    }
}
