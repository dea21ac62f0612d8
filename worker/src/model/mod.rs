//! The multi-task network: a ResNet [`backbone`] with taps C3-C5, an [`fpn`] neck giving P3-P5,
//! and one head per enabled task (see [`crate::tasks`]). Variables live in one `VarStore` under
//! `backbone.` (torchvision names), `neck.` and `heads.{classification,detection,segmentation}.`,
//! so the shared and per-task parameters can be told apart for PCGrad/GradNorm.
pub(crate) mod backbone;
pub(crate) mod fpn;
pub(crate) mod layers;
pub(crate) mod norm;
mod predict;
pub(crate) mod sync_batch_norm;

use std::path::Path;

use mtl_job::{ModelSection, TasksSection};
use tch::{nn, Device, Tensor};

pub(crate) use self::predict::{predict, Prediction};
use crate::data::batch::DatasetInfo;
use crate::task::Task;
use crate::tasks::classification::ClassificationHead;
use crate::tasks::detection::{DetOutput, DetectionHead};
use crate::tasks::segmentation::SegmentationHead;
use crate::WorkerError;
use backbone::Backbone;
use fpn::Fpn;

/// LibTorch has one random generator per process. Seeding it and drawing from it (initial
/// weights, test data) must not interleave with another thread doing the same, or "the initial
/// weights follow `job.seed`" stops being true; tests build models on parallel threads.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` with LibTorch's generator seeded with `seed`, while no other caller of this
/// function draws from it.
pub(crate) fn with_seed<T>(seed: i64, f: impl FnOnce() -> T) -> T {
    let _guard = SEEDED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(seed);
    f()
}

/// VarStore prefix of the backbone (its names below it are torchvision's).
pub(crate) const BACKBONE_PREFIX: &str = "backbone";
/// VarStore prefix of the FPN.
pub(crate) const NECK_PREFIX: &str = "neck";

/// What one forward pass produced; a disabled task's output is `None`.
#[derive(Debug)]
pub struct Outputs {
    /// Classification logits `[B,C]`.
    pub cls: Option<Tensor>,
    /// FCOS outputs per level.
    pub det: Option<DetOutput>,
    /// Segmentation logits `[B,K,H,W]` at the input size.
    pub seg: Option<Tensor>,
    /// Input height and width in pixels.
    pub image_hw: (i64, i64),
}

/// Backbone + FPN + the heads enabled in `[tasks]`.
#[derive(Debug)]
pub struct MultiTaskModel {
    vs: nn::VarStore,
    backbone: Backbone,
    neck: Fpn,
    cls: Option<ClassificationHead>,
    det: Option<DetectionHead>,
    seg: Option<SegmentationHead>,
    tasks: TasksSection,
    /// Lay out input images channels_last (`train.channels_last`, see [`crate::kernels`]).
    channels_last: bool,
}

fn check(ok: bool, key: &str, message: impl FnOnce() -> String) -> Result<(), WorkerError> {
    if ok {
        Ok(())
    } else {
        Err(WorkerError::Model { key: key.into(), message: message() })
    }
}

impl MultiTaskModel {
    /// Builds the model on `device` with the current tch RNG (seed it with
    /// `tch::manual_seed` first for identical replicas), then loads `model.pretrained` if set.
    pub fn new(
        model: &ModelSection,
        tasks: &TasksSection,
        info: &DatasetInfo,
        device: Device,
    ) -> Result<Self, WorkerError> {
        if tasks.classification {
            check(!info.class_names.is_empty(), "dataset.class_names", || "no classes to classify".into())?;
            check(info.multi_label == tasks.multi_label, "tasks.multi_label", || {
                format!("is {} but the dataset says multi_label = {}", tasks.multi_label, info.multi_label)
            })?;
        }
        if tasks.detection {
            check(!info.det_categories.is_empty(), "dataset.det_categories", || {
                "no detection categories".into()
            })?;
        }
        if tasks.segmentation {
            let n = info.seg_classes.len();
            check((1..=255).contains(&n), "dataset.seg_classes", || {
                format!("{n} classes, expected 1..=255")
            })?;
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let width = i64::from(model.width());
        let channels = i64::from(model.fpn_channels());
        let backbone = Backbone::new(&root / BACKBONE_PREFIX, model.backbone, width, model.norm);
        let neck = Fpn::new(&root / NECK_PREFIX, backbone.out_channels(), channels);
        let head = |task: Task| &root / "heads" / task.name();
        let cls = tasks.classification.then(|| {
            let c5 = backbone.out_channels()[2];
            ClassificationHead::new(head(Task::Classification), c5, info.class_names.len() as i64)
        });
        let det = tasks
            .detection
            .then(|| DetectionHead::new(head(Task::Detection), channels, info.det_categories.len() as i64));
        let seg = tasks.segmentation.then(|| {
            SegmentationHead::new(head(Task::Segmentation), channels, info.seg_classes.len() as i64)
        });
        let model_out =
            MultiTaskModel { vs, backbone, neck, cls, det, seg, tasks: tasks.clone(), channels_last: false };
        if let Some(path) = &model.pretrained {
            model_out.load_pretrained_backbone(Path::new(path))?;
        }
        Ok(model_out)
    }

    /// Runs the network on `images` (`[B,3,H,W]`); `train` switches BatchNorm to batch
    /// statistics. A LibTorch failure (an input of the wrong shape, the device out of memory)
    /// is an error naming the layer or head.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<Outputs, WorkerError> {
        let image_hw = match images.size().as_slice() {
            &[_, 3, h, w] => (h, w),
            other => {
                return Err(WorkerError::TorchAt {
                    at: "model input".into(),
                    source: tch::TchError::Shape(format!("expected images [B,3,H,W], got {other:?}")),
                })
            }
        };
        let laid_out;
        let images = if self.channels_last {
            laid_out = crate::kernels::channels_last(images)?;
            &laid_out
        } else {
            images
        };
        let c = self.backbone.forward(images, train)?;
        let p = if self.det.is_some() || self.seg.is_some() { Some(self.neck.forward(&c)?) } else { None };
        Ok(Outputs {
            cls: self.cls.as_ref().map(|h| h.forward(&c[2])).transpose()?,
            det: self.det.as_ref().zip(p.as_ref()).map(|(h, p)| h.forward(p)).transpose()?,
            seg: self.seg.as_ref().zip(p.as_ref()).map(|(h, p)| h.forward(p, image_hw)).transpose()?,
            image_hw,
        })
    }

    /// The shared weight where GradNorm compares the tasks' gradient norms: the last stage's
    /// shortcut convolution (`backbone.layer4.0.downsample.0.weight`). Every head reads C5
    /// (classification directly, detection and segmentation through the FPN), and C5 is a sum
    /// with this convolution's output, so every enabled task's loss reaches it, with a
    /// non-zero gradient from the first step. The last convolution of each residual branch
    /// would not do: its norm's scale starts at 0 (`zero_init_residual`), which makes its
    /// gradient exactly 0 until that scale has moved; the FPN's output convs are not reached
    /// by classification at all.
    pub fn gradnorm_layer(&self) -> Tensor {
        self.backbone.last_stage_shortcut().shallow_clone()
    }

    /// Loads a backbone-only safetensors file with torchvision names (see docs/MODEL.md).
    pub fn load_pretrained_backbone(&self, path: &Path) -> Result<(), WorkerError> {
        backbone::load_backbone(&self.vs, BACKBONE_PREFIX, path)
    }

    /// Whether `task`'s head was built.
    pub fn has_task(&self, task: Task) -> bool {
        match task {
            Task::Classification => self.cls.is_some(),
            Task::Detection => self.det.is_some(),
            Task::Segmentation => self.seg.is_some(),
        }
    }

    /// The `[tasks]` section the model was built with.
    pub fn tasks(&self) -> &TasksSection {
        &self.tasks
    }

    /// Whether the forward pass lays out its input channels_last (the weights are laid out by
    /// [`crate::kernels::to_channels_last`], which sets this).
    pub(crate) fn set_channels_last(&mut self, on: bool) {
        self.channels_last = on;
    }

    /// The variable store (for optimizers, checkpoints, broadcasting initial parameters).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the variable store (loading, moving to a device).
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// P3/P4/P5 sizes for an input of `h`x`w` pixels.
    pub fn feature_sizes(&self, h: i64, w: i64) -> [(i64, i64); 3] {
        backbone::feature_sizes(h, w)
    }

    /// Trainable variables whose name starts with `prefix.`, sorted by name.
    fn trainable_under(&self, prefixes: &[&str]) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, t)| {
                t.requires_grad() && prefixes.iter().any(|p| name.starts_with(&format!("{p}.")))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// All trainable parameters, sorted by name (a stable order across ranks).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.trainable_under(&[BACKBONE_PREFIX, NECK_PREFIX, "heads"])
    }

    /// Trainable parameters shared by all tasks (backbone and neck), sorted by name.
    pub fn shared_parameters(&self) -> Vec<(String, Tensor)> {
        self.trainable_under(&[BACKBONE_PREFIX, NECK_PREFIX])
    }

    /// Trainable parameters of `task`'s head, sorted by name (empty if the task is off).
    pub fn head_parameters(&self, task: Task) -> Vec<(String, Tensor)> {
        self.trainable_under(&[&format!("heads.{}", task.name())])
    }

    /// The context the model's SyncBatchNorm layers reduce through (`norm = "sync_batch"` only).
    pub(crate) fn sync_context(&self) -> Option<&std::sync::Arc<sync_batch_norm::SyncContext>> {
        self.backbone.norms().sync_context()
    }

    /// The buffers a training forward pass changes (BatchNorm's running statistics), sorted by
    /// name; empty when there are none (frozen statistics never change). Data-parallel ranks keep
    /// them identical by broadcasting rank 0's after every step.
    pub(crate) fn running_buffers(&self) -> Vec<(String, Tensor)> {
        if !self.backbone.norms().updates_buffers() {
            return Vec::new();
        }
        let mut v: Vec<_> = self.vs.variables().into_iter().filter(|(_, t)| !t.requires_grad()).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Whether a parameter is exempt from weight decay: norm weights and biases, conv/linear
    /// biases and the FCOS per-level scales, i.e. every parameter with at most one dimension.
    pub fn no_weight_decay(param: &Tensor) -> bool {
        param.dim() <= 1
    }
}

#[cfg(test)]
mod tests;
