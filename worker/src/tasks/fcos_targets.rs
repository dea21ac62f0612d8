//! FCOS target assignment (Tian et al. 2019, with mmdetection's defaults): every feature
//! location of P3-P5 is positive for the smallest ground-truth box that (a) contains it within a
//! "center sampling" region of 1.5 strides around the box centre and (b) whose largest ltrb
//! distance falls in the level's size range; its targets are that box's class and ltrb
//! distances in pixels. Crowd boxes are never targets.
use tch::{Device, TchError, Tensor};

use crate::data::batch::{host_tensor_from, moved, GtBox, Part};

/// Strides of P3, P4, P5.
pub(crate) const STRIDES: [i64; 3] = [8, 16, 32];
/// Range (exclusive, inclusive] of max(l,t,r,b) each level is responsible for.
const SIZE_RANGES: [(f32, f32); 3] = [(-1.0, 64.0), (64.0, 128.0), (128.0, f32::INFINITY)];
/// Center sampling radius in strides.
const CENTER_RADIUS: f32 = 1.5;

/// Pixel centre `(x, y)` and stride of every location, level by level, row-major, in the order
/// the head's outputs are flattened.
pub(crate) fn locations(sizes: &[(i64, i64); 3]) -> Vec<(f32, f32, f32)> {
    let mut out = Vec::new();
    for (&(h, w), &stride) in sizes.iter().zip(&STRIDES) {
        let s = stride as f32;
        for i in 0..h {
            for j in 0..w {
                out.push((j as f32 * s + s / 2.0, i as f32 * s + s / 2.0, s));
            }
        }
    }
    out
}

/// Detection targets of a batch over all locations (`N` = locations of P3-P5).
#[derive(Debug)]
pub(crate) struct FcosTargets {
    /// `[B,N]` i64: the category of a positive location, -1 for background.
    pub labels: Tensor,
    /// `[B,N,4]` f32: (l,t,r,b) distances in pixels; zero at background.
    pub ltrb: Tensor,
    /// `[B]` bool: the image's detection labels are present.
    pub labelled: Tensor,
    /// Positive locations in labelled images.
    pub num_positives: usize,
    /// The P3-P5 sizes the locations are on.
    pub sizes: [(i64, i64); 3],
}

/// Assigns one image's boxes: per location, the category (or -1) and ltrb target.
pub(crate) fn assign(boxes: &[GtBox], locs: &[(f32, f32, f32)]) -> (Vec<i64>, Vec<[f32; 4]>) {
    let mut labels = vec![-1i64; locs.len()];
    let mut ltrb = vec![[0f32; 4]; locs.len()];
    for (k, &(x, y, s)) in locs.iter().enumerate() {
        let level = STRIDES.iter().position(|&st| st as f32 == s).expect("a known stride");
        let (lo, hi) = SIZE_RANGES[level];
        let mut best_area = f32::INFINITY;
        for b in boxes.iter().filter(|b| !b.iscrowd) {
            let d = [x - b.x1, y - b.y1, b.x2 - x, b.y2 - y];
            let (cx, cy, r) = ((b.x1 + b.x2) / 2.0, (b.y1 + b.y2) / 2.0, CENTER_RADIUS * s);
            let inside_center = x - (cx - r).max(b.x1) > 0.0
                && y - (cy - r).max(b.y1) > 0.0
                && (cx + r).min(b.x2) - x > 0.0
                && (cy + r).min(b.y2) - y > 0.0;
            let max_d = d.iter().copied().fold(f32::MIN, f32::max);
            let area = (b.x2 - b.x1) * (b.y2 - b.y1);
            if inside_center && max_d > lo && max_d <= hi && area < best_area {
                best_area = area;
                labels[k] = i64::from(b.category);
                ltrb[k] = d;
            }
        }
    }
    (labels, ltrb)
}

impl FcosTargets {
    /// Targets for every image of a batch whose P3-P5 sizes are `sizes`; unlabelled images get
    /// no positives. `boxes` and `labelled` have one entry per image.
    pub(crate) fn new(
        boxes: &[Vec<GtBox>],
        labelled: &[bool],
        sizes: &[(i64, i64); 3],
    ) -> Result<Self, TchError> {
        Self::build(boxes, labelled, sizes, false)
    }

    /// [`FcosTargets::new`] with its tensors in pinned host memory when `pinned` (the loader's
    /// batches for a GPU). Runs no parallel LibTorch op, so loader threads can call it (see
    /// `data::batch::host_tensor_from`).
    pub(crate) fn build(
        boxes: &[Vec<GtBox>],
        labelled: &[bool],
        sizes: &[(i64, i64); 3],
        pinned: bool,
    ) -> Result<Self, TchError> {
        if boxes.len() != labelled.len() {
            return Err(TchError::Shape(format!(
                "{} images with boxes but {} detection label flags",
                boxes.len(),
                labelled.len()
            )));
        }
        let locs = locations(sizes);
        let n = locs.len() as i64;
        let mut all_labels = Vec::with_capacity(boxes.len() * locs.len());
        let mut all_ltrb = Vec::with_capacity(boxes.len() * locs.len() * 4);
        for (image_boxes, &is_labelled) in boxes.iter().zip(labelled) {
            let (labels, ltrb) = if is_labelled {
                assign(image_boxes, &locs)
            } else {
                (vec![-1; locs.len()], vec![[0.0; 4]; locs.len()])
            };
            all_labels.extend(labels);
            all_ltrb.extend(ltrb.into_iter().flatten());
        }
        let b = boxes.len() as i64;
        let num_positives = all_labels.iter().filter(|&&l| l >= 0).count();
        Ok(FcosTargets {
            labels: host_tensor_from(&[Part::Copy(&all_labels)], &[b, n], pinned)?,
            ltrb: host_tensor_from(&[Part::Copy(&all_ltrb)], &[b, n, 4], pinned)?,
            labelled: host_tensor_from(&[Part::Copy(labelled)], &[b], pinned)?,
            num_positives,
            sizes: *sizes,
        })
    }

    /// The targets on `device` (non-blocking copies, see `data::batch::moved`).
    pub(crate) fn to_device(&self, device: Device) -> Result<Self, TchError> {
        self.map_tensors(|t| moved(t, device))
    }

    /// The same targets with `f` applied to each tensor.
    pub(crate) fn map_tensors(
        &self,
        f: impl Fn(&Tensor) -> Result<Tensor, TchError>,
    ) -> Result<Self, TchError> {
        Ok(FcosTargets {
            labels: f(&self.labels)?,
            ltrb: f(&self.ltrb)?,
            labelled: f(&self.labelled)?,
            num_positives: self.num_positives,
            sizes: self.sizes,
        })
    }

    /// Another handle to the same tensors.
    pub(crate) fn shallow_clone(&self) -> Self {
        FcosTargets {
            labels: self.labels.shallow_clone(),
            ltrb: self.ltrb.shallow_clone(),
            labelled: self.labelled.shallow_clone(),
            num_positives: self.num_positives,
            sizes: self.sizes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(x1: f32, y1: f32, x2: f32, y2: f32, category: u32) -> GtBox {
        GtBox { x1, y1, x2, y2, category, iscrowd: false }
    }

    #[test]
    fn locations_are_stride_centres_level_by_level() {
        let locs = locations(&[(2, 2), (1, 1), (1, 1)]);
        assert_eq!(locs[..4], [(4.0, 4.0, 8.0), (12.0, 4.0, 8.0), (4.0, 12.0, 8.0), (12.0, 12.0, 8.0)]);
        assert_eq!(locs[4..], [(8.0, 8.0, 16.0), (16.0, 16.0, 32.0)]);
    }

    #[test]
    fn boxes_go_to_their_size_level_and_centre() {
        // 64x64 input: P3 8x8, P4 4x4, P5 2x2.
        let sizes = [(8, 8), (4, 4), (2, 2)];
        let locs = locations(&sizes);
        // A 16x16 box centred at (20,20): max distance < 64, so P3 only. Its centre region
        // [8,32] clipped to the box is [12,28]; of the P3 centres 4,12,20,28 only 20 lies
        // strictly inside, so exactly one location is positive.
        let small = gt(12.0, 12.0, 28.0, 28.0, 3);
        let (labels, ltrb) = assign(&[small], &locs);
        let pos: Vec<usize> = (0..locs.len()).filter(|&k| labels[k] >= 0).collect();
        assert_eq!(pos, vec![2 * 8 + 2]);
        assert_eq!(locs[pos[0]], (20.0, 20.0, 8.0));
        assert_eq!(labels[pos[0]], 3);
        assert_eq!(ltrb[pos[0]], [8.0, 8.0, 8.0, 8.0]);

        // A 200x60 box on a 256x256 input: locations near its centre have max distance > 64,
        // so only P4 (64..=128) and P5 (> 128) can take it.
        let wide = gt(0.0, 2.0, 200.0, 62.0, 1);
        let locs = locations(&[(32, 32), (16, 16), (8, 8)]);
        let (labels, ltrb) = assign(&[wide], &locs);
        for (k, &(x, y, s)) in locs.iter().enumerate() {
            if labels[k] < 0 {
                continue;
            }
            let m = ltrb[k].iter().copied().fold(0.0, f32::max);
            assert!(s == 16.0 && m > 64.0 && m <= 128.0 || s == 32.0 && m > 128.0, "{x},{y},{s}: {m}");
            assert!((x - 100.0).abs() < 1.5 * s && (y - 32.0).abs() < 1.5 * s);
        }
        assert!(locs.iter().zip(&labels).any(|(l, &c)| c == 1 && l.2 == 16.0));
    }

    #[test]
    fn overlapping_boxes_pick_the_smaller_and_crowds_are_ignored() {
        let locs = locations(&[(8, 8), (4, 4), (2, 2)]);
        let big = gt(4.0, 4.0, 60.0, 60.0, 0);
        let inner = gt(16.0, 16.0, 40.0, 40.0, 2);
        let (labels, _) = assign(&[big, inner], &locs);
        let k = locs.iter().position(|&l| l == (28.0, 28.0, 8.0)).unwrap();
        assert_eq!(labels[k], 2);
        let crowd = GtBox { iscrowd: true, ..inner };
        let (labels, _) = assign(&[crowd], &locs);
        assert!(labels.iter().all(|&l| l < 0));
    }

    #[test]
    fn unlabelled_images_have_no_positives() {
        let boxes = vec![vec![gt(12.0, 12.0, 28.0, 28.0, 0)], vec![gt(12.0, 12.0, 28.0, 28.0, 0)]];
        let t = FcosTargets::new(&boxes, &[true, false], &[(8, 8), (4, 4), (2, 2)]).unwrap();
        assert_eq!(t.num_positives, 1);
        assert_eq!(t.labels.size(), [2, 84]);
        assert_eq!(t.labels.get(1).max().int64_value(&[]), -1);
    }
}
