//! The shared data contract: what the loader hands to the training step (and to evaluation).
//! Every task is labelled (or not) per sample.
use std::ffi::{c_char, c_int};
use std::sync::{Mutex, PoisonError};

use tch::{Device, Kind, TchError, Tensor};
use torch_sys::C_tensor;

use super::loader::LoaderConfig;
use super::sample::BoxLabel;
use crate::tasks::fcos_targets::FcosTargets;
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

/// One training or evaluation batch. As the loader collates it, every tensor is on the CPU
/// (in pinned memory when the loader was told the step runs on a GPU) and images and masks are
/// u8; [`Batch::to_device`] gives the network's form: f32 normalised images and i64 masks on
/// the device. A batch made by hand may already be in that form (see `to_device`).
#[derive(Debug)]
pub struct Batch {
    /// Sample ids, in the order of the shard.
    pub ids: Vec<u64>,
    /// `[B, 3, H, W]`: u8 RGB as collated; f32 normalised with the ImageNet mean and std after
    /// [`Batch::to_device`].
    pub images: Tensor,
    /// Image-level class targets.
    pub class_target: ClassTarget,
    /// `[B]` bool: the sample has a class label.
    pub class_labelled: Tensor,
    /// Ground-truth boxes per image.
    pub boxes: Vec<Vec<GtBox>>,
    /// Detection labels present per image (a labelled image may have 0 boxes).
    pub boxes_labelled: Vec<bool>,
    /// `[B, H, W]` class ids, 255 = ignore (all 255 where unlabelled): u8 as collated, i64
    /// after [`Batch::to_device`].
    pub mask_target: Tensor,
    /// `[B]` bool: the sample has a segmentation mask.
    pub mask_labelled: Tensor,
    /// Per image, its size and boxes before any transform: evaluation scores detections against
    /// these, in the original image's coordinates, as pycocotools does.
    pub originals: Vec<OriginalSample>,
    /// FCOS targets of `boxes` on the grid the loader was given (`LoaderConfig::det_grid`),
    /// built in the loader thread; `None` when it was given none (the step then builds them).
    pub(crate) det_targets: Option<FcosTargets>,
    /// The samples' colour jitter (drawn by the augmentation), which [`Batch::to_device`]
    /// applies; `None` when there is none to apply.
    pub(crate) colour_jitter: Option<ColourJitter>,
}

/// The per-sample colour jitter of a batch, for the device: `factors` `[B, 3]` f32
/// (brightness, contrast, saturation) and `inside` `[B, 4]` i64 (`[y0, y1, x0, x1]`: the
/// pixels inside the source image; an empty rectangle for a sample without jitter).
#[derive(Debug)]
pub(crate) struct ColourJitter {
    pub(crate) factors: Tensor,
    pub(crate) inside: Tensor,
}

impl ColourJitter {
    /// The jitter of `items`, `None` when none of them carries any.
    fn collate(items: &[Prepared], pinned: bool) -> Result<Option<Self>, TchError> {
        if items.iter().all(|p| p.sample.jitter.is_none()) {
            return Ok(None);
        }
        let b = items.len() as i64;
        let factors: Vec<f32> =
            items.iter().flat_map(|p| p.sample.jitter.map_or([1.0; 3], |j| j.factors)).collect();
        let inside: Vec<i64> =
            items.iter().flat_map(|p| p.sample.jitter.map_or([0; 4], |j| j.inside)).collect();
        Ok(Some(Self {
            factors: host_tensor_from(&[Part::Copy(&factors)], &[b, 3], pinned)?,
            inside: host_tensor_from(&[Part::Copy(&inside)], &[b, 4], pinned)?,
        }))
    }

    /// `x` (`[B, 3, H, W]` f32 in 0..255, on `device`) jittered per sample
    /// ([`super::augment::Jitter`]): brightness, then contrast around the mean grey of the
    /// sample's pixels inside the source image, then saturation around each pixel's grey, each
    /// clamped to 0..255; pixels outside that rectangle (padding) are left as they are. A
    /// few batched ops on the device, with no host read.
    fn apply(&self, x: &Tensor, grey_weights: &Tensor, device: Device) -> Result<Tensor, TchError> {
        let [b, _, h, w] = x.size()[..] else {
            return Err(TchError::Shape(format!("colour jitter of images of shape {:?}", x.size())));
        };
        let factors = moved(&self.factors, device)?;
        let inside = moved(&self.inside, device)?;
        let factor = |k: i64| factors.f_select(1, k)?.f_view([b, 1, 1, 1]);
        // [B, n]: position i of an axis of length n is in [lo, hi) of its sample.
        let within = |n: i64, lo: i64| -> Result<Tensor, TchError> {
            let at = Tensor::f_arange(n, (Kind::Int64, device))?.f_unsqueeze(0)?;
            let (from, to) = (inside.f_narrow(1, lo, 1)?, inside.f_narrow(1, lo + 1, 1)?);
            at.f_ge_tensor(&from)?.f_logical_and(&at.f_lt_tensor(&to)?)
        };
        let mask = within(h, 0)?.f_view([b, 1, h, 1])?.f_logical_and(&within(w, 2)?.f_view([b, 1, 1, w])?)?;
        let grey =
            |t: &Tensor| t.f_mul(grey_weights)?.f_sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
        let bright = x.f_mul(&factor(0)?)?.f_clamp(0.0, 255.0)?;
        let weight = mask.f_to_kind(Kind::Float)?;
        let count = weight.f_sum_dim_intlist([2i64, 3].as_slice(), true, Kind::Float)?.f_clamp_min(1.0)?;
        let mean = grey(&bright)?
            .f_mul(&weight)?
            .f_sum_dim_intlist([2i64, 3].as_slice(), true, Kind::Float)?
            .f_div(&count)?;
        let contrasted = bright.f_sub(&mean)?.f_mul(&factor(1)?)?.f_add(&mean)?.f_clamp(0.0, 255.0)?;
        let g = grey(&contrasted)?;
        let saturated = contrasted.f_sub(&g)?.f_mul(&factor(2)?)?.f_add(&g)?.f_clamp(0.0, 255.0)?;
        saturated.f_where_self(&mask, x)
    }
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

/// The weights of R, G and B in the grey that contrast and saturation jitter work around.
pub(crate) const GREY: [f32; 3] = [0.299, 0.587, 0.114];

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
    /// Stacks prepared samples of one `cfg.augment.image_size` square resolution (an empty
    /// slice gives B = 0): images and masks as u8, in pinned memory when `cfg.pin_memory`, and
    /// the FCOS targets when `cfg.det_grid` is set. Every sample's image must be that size.
    pub fn collate(items: &[Prepared], info: &DatasetInfo, cfg: &LoaderConfig) -> Result<Batch, TchError> {
        use super::sample::ClassLabel;
        let pinned = cfg.pin_memory;
        let b = items.len() as i64;
        let size = cfg.augment.image_size as usize;
        let s = size as i64;
        let wrong_size = |p: &&Prepared| {
            p.sample.image.len() != 3 * size * size
                || p.sample.mask.as_ref().is_some_and(|m| m.len() != size * size)
        };
        if let Some(p) = items.iter().find(wrong_size) {
            return Err(TchError::Shape(format!("sample {}: image or mask is not {size}x{size}", p.id)));
        }
        let images: Vec<Part<u8>> = items.iter().map(|p| Part::Copy(&p.sample.image)).collect();
        let images = host_tensor_from(&images, &[b, 3, s, s], pinned)?;
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
            ClassTarget::Multi(host_tensor_from(&[Part::Copy(&hot)], &[b, c as i64], pinned)?)
        } else {
            let labels: Vec<i64> = items
                .iter()
                .map(|p| match &p.class {
                    Some(ClassLabel::Single(k)) => i64::from(*k),
                    _ => -1,
                })
                .collect();
            ClassTarget::Single(host_tensor_from(&[Part::Copy(&labels)], &[b], pinned)?)
        };
        let class_labelled: Vec<bool> = items.iter().map(|p| p.class.is_some()).collect();
        let mask_labelled: Vec<bool> = items.iter().map(|p| p.sample.mask.is_some()).collect();
        let masks: Vec<Part<u8>> = items
            .iter()
            .map(|p| match &p.sample.mask {
                Some(m) => Part::Copy(m),
                None => Part::Fill(IGNORE_INDEX, size * size),
            })
            .collect();
        let boxes: Vec<Vec<GtBox>> = items.iter().map(|p| p.sample.boxes.clone()).collect();
        let boxes_labelled: Vec<bool> = items.iter().map(|p| p.boxes_labelled).collect();
        let det_targets = cfg
            .det_grid
            .as_ref()
            .map(|grid| FcosTargets::build(&boxes, &boxes_labelled, grid, pinned))
            .transpose()?;
        let colour_jitter = ColourJitter::collate(items, pinned)?;
        Ok(Batch {
            ids: items.iter().map(|p| p.id).collect(),
            images,
            class_target,
            class_labelled: host_tensor_from(&[Part::Copy(&class_labelled)], &[b], pinned)?,
            boxes,
            boxes_labelled,
            mask_target: host_tensor_from(&masks, &[b, s, s], pinned)?,
            mask_labelled: host_tensor_from(&[Part::Copy(&mask_labelled)], &[b], pinned)?,
            originals: items.iter().map(|p| p.original.clone()).collect(),
            det_targets,
            colour_jitter,
        })
    }
}

impl Batch {
    /// The batch in the network's form on `device` (boxes stay on the host): u8 images become
    /// f32 normalised with the ImageNet mean and std and u8 masks i64, both on the device
    /// (see [`network_images`]); tensors already in that form are only moved. Copies to a GPU
    /// are non-blocking (asynchronous from the pinned memory the loader collates into).
    pub(crate) fn to_device(&self, device: Device) -> Result<Batch, TchError> {
        let mask_target = match self.mask_target.kind() {
            Kind::Uint8 => moved(&self.mask_target, device)?.f_to_kind(Kind::Int64)?,
            _ => moved(&self.mask_target, device)?,
        };
        Ok(Batch {
            ids: self.ids.clone(),
            images: network_input(&self.images, self.colour_jitter.as_ref(), device)?,
            class_target: match &self.class_target {
                ClassTarget::Single(t) => ClassTarget::Single(moved(t, device)?),
                ClassTarget::Multi(t) => ClassTarget::Multi(moved(t, device)?),
            },
            class_labelled: moved(&self.class_labelled, device)?,
            boxes: self.boxes.clone(),
            boxes_labelled: self.boxes_labelled.clone(),
            mask_target,
            mask_labelled: moved(&self.mask_labelled, device)?,
            originals: self.originals.clone(),
            det_targets: self.det_targets.as_ref().map(|t| t.to_device(device)).transpose()?,
            colour_jitter: None,
        })
    }
}

/// `t` on `device`, copied without blocking the host when that is a GPU (safe from any host
/// memory; asynchronous only from pinned memory); `t` itself when it is there already.
pub(crate) fn moved(t: &Tensor, device: Device) -> Result<Tensor, TchError> {
    t.f_to_device_(device, t.kind(), true, false)
}

/// The network input on `device` from collated images: `[B,3,H,W]` u8 is copied as u8 (a
/// quarter of the bytes of f32) and normalised there, `(x / 255 - mean) / std` per channel
/// with the ImageNet constants, as `x * (1 / (255 std)) - mean / std`; images of any other kind
/// are taken as already normalised and only moved. Evaluation and `worker predict` build their
/// input here; training too, through [`Batch::to_device`], which adds the colour jitter.
pub(crate) fn network_images(images: &Tensor, device: Device) -> Result<Tensor, TchError> {
    network_input(images, None, device)
}

/// [`network_images`], with `jitter` applied (on the device, in grey levels) before the
/// normalisation.
fn network_input(images: &Tensor, jitter: Option<&ColourJitter>, device: Device) -> Result<Tensor, TchError> {
    if images.kind() != Kind::Uint8 {
        return moved(images, device);
    }
    let c = constants(device)?;
    let mut x = moved(images, device)?.f_to_kind(Kind::Float)?;
    if let Some(jitter) = jitter {
        x = jitter.apply(&x, &c.grey, device)?;
    }
    x.f_mul(&c.scale)?.f_sub(&c.shift)
}

/// The constants of [`network_input`] on one device: the `[1,3,1,1]` normalisation scale and
/// shift, and the RGB weights of grey.
struct Constants {
    device: Device,
    scale: Tensor,
    shift: Tensor,
    grey: Tensor,
}

/// [`Constants`] on `device`, made once per device so that a step copies no constants to it.
fn constants(device: Device) -> Result<Constants, TchError> {
    static CONSTANTS: Mutex<Vec<Constants>> = Mutex::new(Vec::new());
    let mut constants = CONSTANTS.lock().unwrap_or_else(PoisonError::into_inner);
    let shared = |c: &Constants| Constants {
        device: c.device,
        scale: c.scale.shallow_clone(),
        shift: c.shift.shallow_clone(),
        grey: c.grey.shallow_clone(),
    };
    if let Some(c) = constants.iter().find(|c| c.device == device) {
        return Ok(shared(c));
    }
    let scale: [f32; 3] = std::array::from_fn(|c| (1.0 / (255.0 * f64::from(IMAGENET_STD[c]))) as f32);
    let shift: [f32; 3] =
        std::array::from_fn(|c| (f64::from(IMAGENET_MEAN[c]) / f64::from(IMAGENET_STD[c])) as f32);
    let on_device = |v: &[f32; 3]| Tensor::f_from_slice(v)?.f_view([1, 3, 1, 1])?.f_to_device(device);
    let c =
        Constants { device, scale: on_device(&scale)?, shift: on_device(&shift)?, grey: on_device(&GREY)? };
    constants.push(shared(&c));
    Ok(c)
}

/// Part of the values of a host tensor (see [`host_tensor_from`]).
pub(crate) enum Part<'a, T> {
    /// These values.
    Copy(&'a [T]),
    /// `n` times this value.
    Fill(T, usize),
}

impl<T> Part<'_, T> {
    fn len(&self) -> usize {
        match self {
            Part::Copy(data) => data.len(),
            Part::Fill(_, n) => *n,
        }
    }
}

/// A CPU tensor of `shape` holding `data`, filled by a plain copy (see [`host_tensor_from`]).
pub(crate) fn host_tensor<T: tch::kind::Element + Copy>(
    data: &[T],
    shape: &[i64],
) -> Result<Tensor, TchError> {
    host_tensor_from(&[Part::Copy(data)], shape, false)
}

/// A CPU tensor of `shape` holding `parts` one after the other, in page-locked (pinned) memory
/// when `pinned` (needs CUDA), written by plain copies. The loader threads build batches with
/// it instead of `Tensor::from_slice`, which (tch 0.24) runs `torch::zeros` first: for a
/// batch-sized tensor that zero-fill is a parallel LibTorch op, so every loader thread started
/// an OpenMP team of its own next to the training thread's. With more OpenMP threads than
/// cores, libgomp's threads stop spinning between ops and the training thread's team sleeps
/// and is woken for every op (docs/PERFORMANCE.md, "Side by side with PyTorch"). For the same
/// reason it does not use tch's `pin_memory` (a parallel copy): a pinned tensor is one
/// allocation through the shim (`worker/shim/pinned.cpp`). Neither allocation touches the
/// memory; the parts are written into it.
pub(crate) fn host_tensor_from<T: tch::kind::Element + Copy>(
    parts: &[Part<'_, T>],
    shape: &[i64],
    pinned: bool,
) -> Result<Tensor, TchError> {
    let numel: i64 = shape.iter().product();
    let len: usize = parts.iter().map(Part::len).sum();
    if usize::try_from(numel).ok() != Some(len) {
        return Err(TchError::Shape(format!("{len} values do not fill a tensor of shape {shape:?}")));
    }
    let tensor =
        if pinned { empty_pinned(shape, T::KIND)? } else { Tensor::f_empty(shape, (T::KIND, Device::Cpu))? };
    if len == 0 {
        return Ok(tensor);
    }
    let base = tensor.data_ptr().cast::<T>();
    let mut at = 0;
    for part in parts {
        // SAFETY: `tensor` was just allocated on the CPU, contiguous, with `len` elements of
        // `T::KIND`, which `tch::kind::Element` (an unsafe trait) guarantees has `T`'s size and
        // layout; the parts' lengths sum to `len`, so every write is inside it; no other handle
        // to its memory exists yet, and the parts' slices are distinct allocations.
        unsafe {
            match part {
                Part::Copy(data) => std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(at), data.len()),
                Part::Fill(value, n) => {
                    for i in 0..*n {
                        base.add(at + i).write(*value);
                    }
                }
            }
        }
        at += part.len();
    }
    Ok(tensor)
}

extern "C" {
    fn mtl_empty_pinned(
        like: *const C_tensor,
        sizes: *const i64,
        ndim: usize,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// An uninitialised pinned CPU tensor (one allocation from LibTorch's caching host allocator).
fn empty_pinned(shape: &[i64], kind: Kind) -> Result<Tensor, TchError> {
    // The dtype travels as a tensor of it: tch keeps its ScalarType codes private.
    let like = Tensor::f_empty([0], (kind, Device::Cpu))?;
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `like` is a live tensor, `shape` a live slice of `shape.len()` sizes, `out` is
    // writable; the shim catches every C++ exception and writes at most `len` bytes to `err`.
    crate::shim::call(|err, len| unsafe {
        mtl_empty_pinned(like.as_ptr(), shape.as_ptr(), shape.len(), &mut out, err, len)
    })
    .map_err(|e| TchError::Torch(format!("pinned host memory for a tensor of shape {shape:?}: {e}")))?;
    // SAFETY: on success the shim stored a new tensor handle that nothing else owns.
    Ok(unsafe { Tensor::from_ptr(out) })
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
