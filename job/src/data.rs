//! `[data]`: where the samples come from and how the worker turns them into batches.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::JobConfigError;

/// The on-disk format of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Shapes on textured backgrounds, generated into `data.train` (a directory) on first use.
    Synthetic,
    /// A JSONL manifest per split (one image a line: file, class, boxes, mask).
    Jsonl,
    /// COCO instances JSON per split (boxes, polygon/RLE masks, categories).
    Coco,
}

/// Which scenes the synthetic generator draws (`data.synthetic_preset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyntheticPreset {
    /// 1-3 overlapping shapes (radius 8-32% of the image) on noise, stripe, gradient or
    /// check backgrounds: the benchmark's data.
    #[default]
    Standard,
    /// 1-2 shapes, a large one (radius 24-36%) and at most a small distractor (8-14%), on
    /// plain or gradient backgrounds: learnable in minutes on a CPU (the demo's data).
    Easy,
}

/// How a COCO image gets its image-level class from its instance annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassRule {
    /// Single-label: the category with the largest total (non-crowd) area.
    LargestArea,
    /// Multi-label: every category with at least one non-crowd instance.
    Presence,
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// `synthetic`, `jsonl` or `coco`.
    pub format: DataFormat,
    /// Training split: the JSONL manifest or COCO JSON; for `synthetic`, the directory that
    /// `worker gen-data shapes` fills (generated on first use unless it holds a complete
    /// dataset, i.e. a `dataset.json`).
    pub train: PathBuf,
    /// Validation split, like `train`; empty means none. Must be empty for `synthetic` (the
    /// generator writes `val.jsonl` next to `train.jsonl`).
    pub val: PathBuf,
    /// COCO only: the directory image `file_name`s are relative to; empty means the directory
    /// of the annotation file.
    pub image_root: PathBuf,
    /// COCO only: how the image-level class is derived (`largest_area` or `presence`).
    pub class_rule: ClassRule,
    /// Synthetic only: number of images generated (train and val together).
    pub synthetic_n: u32,
    /// Synthetic only: side of the generated square images in pixels.
    pub synthetic_size: u32,
    /// Synthetic only: fraction of the generated images written to `val.jsonl`.
    pub synthetic_val_fraction: f64,
    /// Synthetic only: `standard` (the benchmark's scenes) or `easy` (fewer, larger shapes on
    /// plainer backgrounds).
    pub synthetic_preset: SyntheticPreset,
    /// Side of the square network input in pixels (images are letterboxed to it).
    pub image_size: u32,
    /// Threads decoding and augmenting images ahead of the training step.
    pub loader_threads: u32,
    /// Batches prepared ahead of the training step (bounded queue depth).
    pub prefetch_batches: u32,
    /// The largest fraction of an epoch's training images (counted over all ranks) that may be
    /// unreadable (missing or corrupt, skipped by the loader) before the run fails, in [0, 1].
    /// A few bad files are skipped; a run that reads almost nothing stops with an error.
    /// Left out of the written config at its default, so job hashes from before the key
    /// existed still match (it is not part of the hash, see `JobConfig::trained_part`).
    #[serde(skip_serializing_if = "is_default_unreadable_fraction")]
    pub max_unreadable_fraction: f64,
    /// Keep every decoded image (and mask) in memory across epochs, so each file is read and
    /// decoded once per worker process; augmentation still runs every epoch. For datasets whose
    /// decoded pixels (`width × height × 3` bytes an image) fit in each worker's memory.
    /// Unreadable images are still skipped and counted every epoch. Batches are the same
    /// either way, so the key is not part of the config hash and is left out of the written
    /// config when false (the default).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cache_decoded: bool,
    /// Training-time augmentation (evaluation only resizes).
    pub augment: AugmentSection,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            format: DataFormat::Synthetic,
            train: PathBuf::from("data/synthetic"),
            val: PathBuf::new(),
            image_root: PathBuf::new(),
            class_rule: ClassRule::LargestArea,
            synthetic_n: 512,
            synthetic_size: 64,
            synthetic_val_fraction: 0.2,
            synthetic_preset: SyntheticPreset::Standard,
            image_size: 64,
            loader_threads: 2,
            prefetch_batches: 4,
            max_unreadable_fraction: 0.01,
            cache_decoded: false,
            augment: AugmentSection::default(),
        }
    }
}

/// `[data.augment]`: the same geometry is applied to image, boxes and mask; colour jitter
/// touches the image only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentSection {
    /// Probability of a horizontal flip, in [0, 1].
    pub hflip_prob: f64,
    /// Smallest random scale relative to the letterboxed size (> 0).
    pub scale_min: f64,
    /// Largest random scale relative to the letterboxed size (>= `scale_min`); the scaled
    /// image is randomly cropped (or padded) to `data.image_size`.
    pub scale_max: f64,
    /// Brightness jitter: factor drawn from [1 - b, 1 + b], b in [0, 1].
    pub brightness: f64,
    /// Contrast jitter: factor drawn from [1 - c, 1 + c], c in [0, 1].
    pub contrast: f64,
    /// Saturation jitter: factor drawn from [1 - s, 1 + s], s in [0, 1].
    pub saturation: f64,
}

impl Default for AugmentSection {
    fn default() -> Self {
        Self {
            hflip_prob: 0.5,
            scale_min: 0.75,
            scale_max: 1.25,
            brightness: 0.2,
            contrast: 0.2,
            saturation: 0.2,
        }
    }
}

impl DataSection {
    /// Checks ranges and relations between `[data]` fields.
    pub fn validate(&self) -> Result<(), JobConfigError> {
        let invalid = |key: &str, message: String| JobConfigError::Invalid { key: key.into(), message };
        if self.train.as_os_str().is_empty() {
            return Err(invalid("data.train", "must name a file (or, for synthetic, a directory)".into()));
        }
        if self.format == DataFormat::Synthetic {
            if !self.val.as_os_str().is_empty() {
                return Err(invalid(
                    "data.val",
                    format!(
                        "must be empty for format = \"synthetic\" (val.jsonl is generated in data.train), got `{}`",
                        self.val.display()
                    ),
                ));
            }
            if self.synthetic_n < 2 {
                return Err(invalid(
                    "data.synthetic_n",
                    format!("must be at least 2, got {}", self.synthetic_n),
                ));
            }
            if !(16..=1024).contains(&self.synthetic_size) {
                return Err(invalid(
                    "data.synthetic_size",
                    format!("must be in 16..=1024, got {}", self.synthetic_size),
                ));
            }
            if !(0.0..1.0).contains(&self.synthetic_val_fraction) {
                return Err(invalid(
                    "data.synthetic_val_fraction",
                    format!("must be in [0, 1), got {}", self.synthetic_val_fraction),
                ));
            }
        }
        if !(8..=4096).contains(&self.image_size) {
            return Err(invalid("data.image_size", format!("must be in 8..=4096, got {}", self.image_size)));
        }
        if self.loader_threads == 0 {
            return Err(invalid("data.loader_threads", "must be at least 1, got 0".into()));
        }
        if self.prefetch_batches == 0 {
            return Err(invalid("data.prefetch_batches", "must be at least 1, got 0".into()));
        }
        if !(0.0..=1.0).contains(&self.max_unreadable_fraction) {
            return Err(invalid(
                "data.max_unreadable_fraction",
                format!("must be in [0, 1], got {}", self.max_unreadable_fraction),
            ));
        }
        let a = &self.augment;
        if !(0.0..=1.0).contains(&a.hflip_prob) {
            return Err(invalid(
                "data.augment.hflip_prob",
                format!("must be in [0, 1], got {}", a.hflip_prob),
            ));
        }
        if !(a.scale_min.is_finite() && a.scale_min > 0.0) {
            return Err(invalid("data.augment.scale_min", format!("must be positive, got {}", a.scale_min)));
        }
        if !(a.scale_max.is_finite() && a.scale_max >= a.scale_min) {
            return Err(invalid(
                "data.augment.scale_max",
                format!("{} is below data.augment.scale_min = {}", a.scale_max, a.scale_min),
            ));
        }
        for (key, value) in [
            ("data.augment.brightness", a.brightness),
            ("data.augment.contrast", a.contrast),
            ("data.augment.saturation", a.saturation),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(invalid(key, format!("must be in [0, 1], got {value}")));
            }
        }
        Ok(())
    }
}

/// Whether `f` is `data.max_unreadable_fraction`'s default.
fn is_default_unreadable_fraction(f: &f64) -> bool {
    *f == DataSection::default().max_unreadable_fraction
}

#[cfg(test)]
mod tests {
    use crate::{DataFormat, JobConfig, JobConfigError};

    fn load(data: &str) -> Result<JobConfig, JobConfigError> {
        let text = format!("[job]\nname = \"a\"\n{data}");
        JobConfig::from_toml(&text)
    }

    fn invalid_key(data: &str) -> String {
        match load(data).unwrap_err() {
            JobConfigError::Invalid { key, .. } | JobConfigError::UnknownKey { key, .. } => key,
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_sections_parse() {
        let cfg = load("").unwrap();
        assert_eq!(
            (cfg.data.format, cfg.data.image_size, cfg.data.loader_threads),
            (DataFormat::Synthetic, 64, 2)
        );
        let cfg = load(
            "[data]\nformat = \"coco\"\ntrain = \"a.json\"\nclass_rule = \"presence\"\n[data.augment]\nhflip_prob = 0.0\n",
        )
        .unwrap();
        assert_eq!(cfg.data.class_rule, crate::ClassRule::Presence);
        assert_eq!(cfg.data.augment.hflip_prob, 0.0);
        assert_eq!(cfg.data.augment.scale_max, 1.25);
        assert_eq!(JobConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        assert_eq!(cfg.data.synthetic_preset, crate::SyntheticPreset::Standard);
        let cfg = load("[data]\nsynthetic_preset = \"easy\"\n").unwrap();
        assert_eq!(cfg.data.synthetic_preset, crate::SyntheticPreset::Easy);
        assert!(!cfg.data.cache_decoded && !cfg.to_toml().contains("cache_decoded"), "left out when false");
        let cfg = load("[data]\ncache_decoded = true\n").unwrap();
        assert!(cfg.data.cache_decoded);
        assert_eq!(JobConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(invalid_key("[data]\nformat = \"parquet\"\n"), "data.format");
        assert_eq!(invalid_key("[data]\nsynthetic_preset = \"hard\"\n"), "data.synthetic_preset");
        assert_eq!(invalid_key("[data.augment]\nhflip_prob = 2.0\n"), "data.augment.hflip_prob");
        assert_eq!(invalid_key("[data.augment]\nscale_min = 1.5\n"), "data.augment.scale_max");
        assert_eq!(invalid_key("[data.augment]\nblur = 1\n"), "data.augment.blur");
        assert_eq!(invalid_key("[data]\nval = \"v.jsonl\"\n"), "data.val");
        assert_eq!(invalid_key("[data]\nloader_threads = 0\n"), "data.loader_threads");
        assert_eq!(invalid_key("[data]\ncache_decoded = \"yes\"\n"), "data.cache_decoded");
        assert_eq!(invalid_key("[data]\nformat = \"jsonl\"\ntrain = \"\"\n"), "data.train");
        assert_eq!(invalid_key("[data]\nsynthetic_val_fraction = 1.0\n"), "data.synthetic_val_fraction");
        assert_eq!(invalid_key("[data]\nmax_unreadable_fraction = 1.5\n"), "data.max_unreadable_fraction");
        assert_eq!(invalid_key("[data]\nmax_unreadable_fraction = -0.1\n"), "data.max_unreadable_fraction");
        assert_eq!(invalid_key("[data]\nmax_unreadable_fraction = nan\n"), "data.max_unreadable_fraction");
        let message = load("[data]\nmax_unreadable_fraction = 2.0\n").unwrap_err().to_string();
        assert!(message.contains("data.max_unreadable_fraction") && message.contains("[0, 1]"), "{message}");
        assert_eq!(
            load("[data]\nmax_unreadable_fraction = 1.0\n").unwrap().data.max_unreadable_fraction,
            1.0
        );
        assert_eq!(load("").unwrap().data.max_unreadable_fraction, 0.01);
    }
}
