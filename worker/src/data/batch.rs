//! The shared data contract: what the loader hands to the training step (and to evaluation).
//! Every task is labelled (or not) per sample.
use tch::{Device, TchError, Tensor};

use super::sample::BoxLabel;
// Defined next to the sample types; still reachable here for the modules that import it from
// this path.
pub(crate) use super::sample::DatasetInfo;

/// One ground-truth box in pixel coordinates of the (augmented) network input, corners
/// (x1, y1, x2, y2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GtBox {
    /// Left edge in pixels.
    pub x1: f32,
    /// Top edge in pixels.
    pub y1: f32,
    /// Right edge in pixels.
    pub x2: f32,
    /// Bottom edge in pixels.
    pub y2: f32,
    /// 0-based contiguous detection category (index into `DatasetInfo::det_categories`).
    pub category: u32,
    /// A COCO crowd region: neither a positive nor a negative for detection.
    pub iscrowd: bool,
}

/// Image-level class targets of a batch.
#[derive(Debug)]
pub enum ClassTarget {
    /// Single-label: `[B]` i64 class index, -1 where unlabelled.
    Single(Tensor),
    /// Multi-label: `[B, C]` f32 0/1 (all 0 where unlabelled; see `Batch::class_labelled`).
    Multi(Tensor),
}

/// One training or evaluation batch, all tensors on the CPU.
#[derive(Debug)]
pub struct Batch {
    /// Sample ids, in the order of the shard.
    pub ids: Vec<u64>,
    /// `[B, 3, H, W]` f32, normalised with the ImageNet mean and std.
    pub images: Tensor,
    /// Image-level class targets.
    pub class_target: ClassTarget,
    /// `[B]` bool: the sample has a class label.
    pub class_labelled: Tensor,
    /// Ground-truth boxes per image.
    pub boxes: Vec<Vec<GtBox>>,
    /// Detection labels present per image (a labelled image may have 0 boxes).
    pub boxes_labelled: Vec<bool>,
    /// `[B, H, W]` i64 class ids, 255 = ignore (all 255 where unlabelled).
    pub mask_target: Tensor,
    /// `[B]` bool: the sample has a segmentation mask.
    pub mask_labelled: Tensor,
    /// Per image, its size and boxes before any transform: evaluation scores detections against
    /// these, in the original image's coordinates, as pycocotools does.
    pub originals: Vec<OriginalSample>,
}

/// A sample as it is on disk, for evaluation in the original image's coordinates.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalSample {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// The boxes as annotated (original pixels, area, crowd flag); empty when unlabelled.
    pub boxes: Vec<BoxLabel>,
}

/// The mask value that losses and metrics ignore.
pub(crate) const IGNORE_INDEX: u8 = 255;

/// ImageNet per-channel mean (RGB, 0..1), used to normalise images.
pub(crate) const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet per-channel standard deviation (RGB, 0..1).
pub(crate) const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One sample after decoding and augmentation, ready to be stacked into a [`Batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Sample id.
    pub id: u64,
    /// The augmented image, boxes and mask.
    pub sample: super::augment::Augmented,
    /// Image-level class, if labelled.
    pub class: Option<super::sample::ClassLabel>,
    /// Detection labels present.
    pub boxes_labelled: bool,
    /// The image's size and boxes before augmentation.
    pub original: OriginalSample,
}

impl Batch {
    /// Stacks prepared samples of one `size × size` resolution (an empty slice gives B = 0).
    pub fn collate(items: &[Prepared], info: &DatasetInfo, size: usize) -> Result<Batch, TchError> {
        use super::sample::ClassLabel;
        let b = items.len() as i64;
        let s = size as i64;
        let pixels: Vec<f32> = items.iter().flat_map(|p| p.sample.image.iter().copied()).collect();
        let images = host_tensor(&pixels, &[b, 3, s, s])?;
        let class_target = if info.multi_label {
            let c = info.class_names.len();
            let mut hot = vec![0f32; items.len() * c];
            for (i, p) in items.iter().enumerate() {
                let classes: &[u32] = match &p.class {
                    Some(ClassLabel::Multi(v)) => v,
                    Some(ClassLabel::Single(k)) => std::slice::from_ref(k),
                    None => &[],
                };
                for &k in classes.iter().filter(|&&k| (k as usize) < c) {
                    hot[i * c + k as usize] = 1.0;
                }
            }
            ClassTarget::Multi(host_tensor(&hot, &[b, c as i64])?)
        } else {
            let labels: Vec<i64> = items
                .iter()
                .map(|p| match &p.class {
                    Some(ClassLabel::Single(k)) => i64::from(*k),
                    _ => -1,
                })
                .collect();
            ClassTarget::Single(host_tensor(&labels, &[b])?)
        };
        let class_labelled: Vec<bool> = items.iter().map(|p| p.class.is_some()).collect();
        let mask_labelled: Vec<bool> = items.iter().map(|p| p.sample.mask.is_some()).collect();
        let mut masks = vec![i64::from(IGNORE_INDEX); items.len() * size * size];
        for (i, p) in items.iter().enumerate() {
            if let Some(m) = &p.sample.mask {
                for (dst, &src) in masks[i * size * size..(i + 1) * size * size].iter_mut().zip(m) {
                    *dst = i64::from(src);
                }
            }
        }
        Ok(Batch {
            ids: items.iter().map(|p| p.id).collect(),
            images,
            class_target,
            class_labelled: host_tensor(&class_labelled, &[b])?,
            boxes: items.iter().map(|p| p.sample.boxes.clone()).collect(),
            boxes_labelled: items.iter().map(|p| p.boxes_labelled).collect(),
            mask_target: host_tensor(&masks, &[b, s, s])?,
            mask_labelled: host_tensor(&mask_labelled, &[b])?,
            originals: items.iter().map(|p| p.original.clone()).collect(),
        })
    }
}

impl Batch {
    /// The batch's tensors on `device` (boxes stay on the host).
    pub(crate) fn to_device(&self, device: Device) -> Result<Batch, TchError> {
        Ok(Batch {
            ids: self.ids.clone(),
            images: self.images.f_to_device(device)?,
            class_target: match &self.class_target {
                ClassTarget::Single(t) => ClassTarget::Single(t.f_to_device(device)?),
                ClassTarget::Multi(t) => ClassTarget::Multi(t.f_to_device(device)?),
            },
            class_labelled: self.class_labelled.f_to_device(device)?,
            boxes: self.boxes.clone(),
            boxes_labelled: self.boxes_labelled.clone(),
            mask_target: self.mask_target.f_to_device(device)?,
            mask_labelled: self.mask_labelled.f_to_device(device)?,
            originals: self.originals.clone(),
        })
    }
}

/// A CPU tensor of `shape` holding `data`, filled by a plain copy. The loader threads build
/// batches with it instead of `Tensor::from_slice`, which (tch 0.24) runs `torch::zeros` first:
/// for a batch-sized tensor that zero-fill is a parallel LibTorch op, so every loader thread
/// started an OpenMP team of its own next to the training thread's. With more OpenMP threads
/// than cores, libgomp's threads stop spinning between ops and the training thread's team
/// sleeps and is woken for every op (docs/PERFORMANCE.md, "Side by side with PyTorch").
/// `Tensor::empty` allocates without touching the memory.
pub(crate) fn host_tensor<T: tch::kind::Element + Copy>(
    data: &[T],
    shape: &[i64],
) -> Result<Tensor, TchError> {
    let numel: i64 = shape.iter().product();
    if usize::try_from(numel).ok() != Some(data.len()) {
        return Err(TchError::Shape(format!(
            "{} values do not fill a tensor of shape {shape:?}",
            data.len()
        )));
    }
    let tensor = Tensor::f_empty(shape, (T::KIND, Device::Cpu))?;
    if !data.is_empty() {
        // SAFETY: `tensor` was just allocated on the CPU, contiguous, with `data.len()` elements
        // of `T::KIND`, which `tch::kind::Element` (an unsafe trait) guarantees has `T`'s size
        // and layout; no other handle to its memory exists yet, and `data` is a distinct
        // allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), tensor.data_ptr().cast::<T>(), data.len()) };
    }
    Ok(tensor)
}

#[cfg(test)]
mod host_tensor_tests {
    use super::*;

    #[test]
    fn host_tensors_equal_from_slice() {
        let f: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        assert!(host_tensor(&f, &[2, 3, 4]).unwrap().equal(&Tensor::from_slice(&f).view([2, 3, 4])));
        let l = [3i64, -1, 255];
        assert!(host_tensor(&l, &[3]).unwrap().equal(&Tensor::from_slice(&l)));
        let b = [true, false, true, true];
        assert!(host_tensor(&b, &[2, 2]).unwrap().equal(&Tensor::from_slice(&b).view([2, 2])));
        assert_eq!(host_tensor::<f32>(&[], &[0, 3, 8, 8]).unwrap().size(), [0, 3, 8, 8]);
        let err = host_tensor(&f, &[5, 5]).unwrap_err().to_string();
        assert!(err.contains("24 values") && err.contains("[5, 5]"), "{err}");
    }
}
