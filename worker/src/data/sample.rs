//! Annotation records as read from disk, before any pixel is decoded, and the label spaces
//! of a dataset.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use image::RgbImage;

use super::rle::Segmentation;

/// What a dataset says about its label spaces.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetInfo {
    /// Classification classes.
    pub class_names: Vec<String>,
    /// Classification is multi-label (sigmoid) rather than single-label (softmax).
    pub multi_label: bool,
    /// Detection categories, (original id, name); the index is the contiguous category.
    pub det_categories: Vec<(u64, String)>,
    /// Segmentation classes; the index is the class id in masks, 0 is background.
    pub seg_classes: Vec<String>,
}

/// An image-level class label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassLabel {
    /// One class index.
    Single(u32),
    /// The set of classes present (sorted, distinct).
    Multi(Vec<u32>),
}

/// One box in the original image's pixels, COCO style (x, y, width, height), kept in f64 as
/// read so that evaluation sees the very numbers pycocotools reads from the same file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxLabel {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
    /// 0-based contiguous detection category.
    pub category: u32,
    /// A crowd region.
    pub iscrowd: bool,
    /// Object area in the original image's pixels, which COCO's small/medium/large ranges
    /// compare: COCO's `area` (the mask area for instances); `w * h` for JSONL boxes.
    pub area: f64,
}

/// Where a sample's semantic mask comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum MaskSource {
    /// A PNG of class ids (255 = ignore).
    Png(PathBuf),
    /// Instance shapes painted in order onto a background of 0.
    Instances(InstanceMasks),
}

/// Instance segmentations of one image, rasterised into a semantic mask on load.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceMasks {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// (value to paint, shape) in annotation order; later ones paint over earlier ones.
    pub shapes: Vec<(u8, Segmentation)>,
}

/// One sample: an image and whatever labels it has. `None` = that task is unlabelled.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRecord {
    /// Stable sample id (the coordinator shards by it; augmentation is keyed by it).
    pub id: u64,
    /// The image file.
    pub image: PathBuf,
    /// Image-level class.
    pub class: Option<ClassLabel>,
    /// Boxes (`Some(vec![])` = labelled, no objects).
    pub boxes: Option<Vec<BoxLabel>>,
    /// Semantic mask.
    pub mask: Option<MaskSource>,
}

/// A whole split: label spaces and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Label spaces.
    pub info: DatasetInfo,
    /// Samples in file order; ids are distinct.
    pub samples: Vec<SampleRecord>,
    /// Decoded images kept across epochs when `data.cache_decoded` is on (empty otherwise).
    pub decoded: DecodedCache,
}

/// A sample's pixels as decoded from its files, before any augmentation.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    /// The image as RGB.
    pub image: RgbImage,
    /// The semantic mask (row-major, the image's size), decoded or rasterised.
    pub mask: Option<Vec<u8>>,
}

/// Decoded samples by id, shared by the loaders of every epoch (the dataset outlives them), so
/// that with `data.cache_decoded` each file is decoded once per process. Only samples that
/// decoded are kept: an unreadable one is tried, skipped and counted again every epoch. It
/// holds every image's RGB pixels (`width × height × 3` bytes each): for datasets that fit in
/// memory. A cache, not data: it compares equal to any other.
#[derive(Default)]
pub struct DecodedCache {
    samples: Mutex<HashMap<u64, Arc<Decoded>>>,
}

impl DecodedCache {
    /// The decoded sample `id`, if cached.
    pub fn get(&self, id: u64) -> Option<Arc<Decoded>> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner).get(&id).cloned()
    }

    /// Keeps sample `id`.
    pub fn insert(&self, id: u64, decoded: Arc<Decoded>) {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner).insert(id, decoded);
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Clone for DecodedCache {
    /// Shares the decoded samples held so far (they are immutable).
    fn clone(&self) -> Self {
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner).clone();
        Self { samples: Mutex::new(samples) }
    }
}

impl PartialEq for DecodedCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for DecodedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodedCache").field("samples", &self.len()).finish()
    }
}

impl Dataset {
    /// A dataset with an empty [`DecodedCache`].
    pub fn new(info: DatasetInfo, samples: Vec<SampleRecord>) -> Self {
        Self { info, samples, decoded: DecodedCache::default() }
    }

    /// Sample ids in file order.
    pub fn ids(&self) -> Vec<u64> {
        self.samples.iter().map(|s| s.id).collect()
    }

    /// Map from sample id to its index in `samples`.
    pub fn index_by_id(&self) -> HashMap<u64, usize> {
        self.samples.iter().enumerate().map(|(i, s)| (s.id, i)).collect()
    }
}
