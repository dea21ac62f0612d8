//! The learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio · lr`.
use std::f64::consts::PI;

use mtl_job::TrainSection;

/// Learning rate as a function of the (0-based) optimiser step.
///
/// For `s < warmup`: `lr · (s+1)/warmup` (the first step already moves; step `warmup−1` runs at
/// `lr`). Then, with `p = (s − warmup)/(total − warmup)` clamped to 1:
/// `min + (lr − min) · (1 + cos(π·p))/2`, `min = min_lr_ratio · lr`. This is PyTorch's
/// `SequentialLR([LinearLR(1/warmup, 1, warmup−1), CosineAnnealingLR(total−warmup, min)], [warmup])`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// All optimiser steps of the run, warmup included.
    pub total_steps: u64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// The schedule `[train]` describes.
    pub(crate) fn from_config(train: &TrainSection) -> Self {
        Self {
            lr: train.lr,
            warmup_steps: train.warmup_steps,
            total_steps: train.steps,
            min_lr_ratio: train.min_lr_ratio,
        }
    }

    /// The learning rate of optimiser step `step` (0-based).
    pub(crate) fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let min_lr = self.min_lr_ratio * self.lr;
        min_lr + (self.lr - min_lr) * 0.5 * (1.0 + (PI * progress).cos())
    }
}
