//! Optimiser settings of `[train]` and the `[weighting]` section: how the worker turns per-task
//! losses into one update. The fields themselves live on [`TrainSection`] (schema.rs) and
//! [`WeightingSection`]; this module holds their types, defaults and validation.
use serde::{Deserialize, Serialize};

use crate::{JobConfigError, TrainSection};

/// Which optimiser the worker runs (`train.optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum (and optionally Nesterov), weight decay added to the gradient.
    Sgd,
    /// Adam with decoupled weight decay (Loshchilov & Hutter).
    Adamw,
}

/// How the per-task losses are combined (`weighting.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightingStrategy {
    /// `Σ w_t·L_t` with the configured `weighting.weights`.
    Fixed,
    /// Kendall et al. 2018: `Σ exp(-s_t)·L_t + s_t` with a learnable log-variance `s_t` per task.
    Uncertainty,
    /// Liu et al. 2019 (Dynamic Weight Average): weights from the ratio of the last two epochs' losses.
    Dwa,
    /// Chen et al. 2018: learnable weights that balance gradient norms at the last shared layer.
    Gradnorm,
    /// Yu et al. 2020: per-task gradients on shared parameters with conflicts projected away.
    Pcgrad,
}

/// One number per task (`weighting.weights`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskWeights {
    /// Classification.
    pub cls: f64,
    /// Detection.
    pub det: f64,
    /// Semantic segmentation.
    pub seg: f64,
}

impl Default for TaskWeights {
    fn default() -> Self {
        Self { cls: 1.0, det: 1.0, seg: 1.0 }
    }
}

/// `[weighting]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WeightingSection {
    /// `fixed`, `uncertainty`, `dwa`, `gradnorm` or `pcgrad`.
    pub strategy: WeightingStrategy,
    /// Fixed loss weights per task; with `pcgrad` they scale each task's loss before its gradient
    /// is taken. Ignored by `uncertainty`, `dwa` and `gradnorm`, which learn or derive their own.
    pub weights: TaskWeights,
    /// DWA softmax temperature (the paper uses 2).
    pub dwa_temperature: f64,
    /// GradNorm asymmetry `alpha` (the paper uses 0.5 to 3; 1.5 for NYUv2).
    pub gradnorm_alpha: f64,
    /// Learning rate of GradNorm's own gradient step on the task weights.
    pub gradnorm_lr: f64,
}

impl Default for WeightingSection {
    fn default() -> Self {
        Self {
            strategy: WeightingStrategy::Fixed,
            weights: TaskWeights::default(),
            dwa_temperature: 2.0,
            gradnorm_alpha: 1.5,
            gradnorm_lr: 0.025,
        }
    }
}

fn invalid(key: &str, message: String) -> JobConfigError {
    JobConfigError::Invalid { key: key.into(), message }
}

fn positive(key: &str, value: f64) -> Result<(), JobConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(key, format!("must be a positive number, got {value}")))
    }
}

fn non_negative(key: &str, value: f64) -> Result<(), JobConfigError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(key, format!("must be a finite number >= 0, got {value}")))
    }
}

impl TrainSection {
    /// Checks the optimiser and schedule fields.
    pub(crate) fn validate_optim(&self) -> Result<(), JobConfigError> {
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(invalid("train.momentum", format!("must be in [0, 1), got {}", self.momentum)));
        }
        if self.nesterov && self.momentum == 0.0 {
            return Err(invalid("train.nesterov", "needs train.momentum > 0".into()));
        }
        non_negative("train.weight_decay", self.weight_decay)?;
        for (i, beta) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(beta) {
                return Err(invalid("train.betas", format!("betas[{i}] must be in [0, 1), got {beta}")));
            }
        }
        positive("train.eps", self.eps)?;
        if self.warmup_steps > self.steps {
            return Err(invalid(
                "train.warmup_steps",
                format!("{} exceeds train.steps = {}", self.warmup_steps, self.steps),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(invalid(
                "train.min_lr_ratio",
                format!("must be in [0, 1], got {}", self.min_lr_ratio),
            ));
        }
        non_negative("train.clip_grad_norm", self.clip_grad_norm)
    }
}

impl WeightingSection {
    /// Checks ranges of the weighting fields.
    pub(crate) fn validate(&self) -> Result<(), JobConfigError> {
        let w = &self.weights;
        for (task, value) in [("cls", w.cls), ("det", w.det), ("seg", w.seg)] {
            non_negative(&format!("weighting.weights.{task}"), value)?;
        }
        positive("weighting.dwa_temperature", self.dwa_temperature)?;
        non_negative("weighting.gradnorm_alpha", self.gradnorm_alpha)?;
        positive("weighting.gradnorm_lr", self.gradnorm_lr)
    }
}

#[cfg(test)]
mod tests {
    use crate::{JobConfig, JobConfigError, OptimizerKind, WeightingStrategy};

    fn parse(extra: &str) -> Result<JobConfig, JobConfigError> {
        JobConfig::from_toml(&format!("[job]\nname = \"a\"\n{extra}"))
    }

    #[test]
    fn optimiser_and_weighting_fields_parse() {
        let cfg = parse(
            "[train]\nsteps = 10\noptimizer = \"adamw\"\nbetas = [0.8, 0.99]\nwarmup_steps = 2\n\
             [weighting]\nstrategy = \"pcgrad\"\nweights = { det = 2.0 }\n",
        )
        .unwrap();
        assert_eq!(cfg.train.optimizer, OptimizerKind::Adamw);
        assert_eq!(cfg.train.betas, [0.8, 0.99]);
        assert_eq!(cfg.weighting.strategy, WeightingStrategy::Pcgrad);
        assert_eq!((cfg.weighting.weights.cls, cfg.weighting.weights.det), (1.0, 2.0));
        let back = JobConfig::from_toml(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg, "round trip through TOML");
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        for (extra, key) in [
            ("[train]\nmomentum = 1.0\n", "train.momentum"),
            ("[train]\nmomentum = 0.0\nnesterov = true\n", "train.nesterov"),
            ("[train]\nbetas = [0.9, 1.5]\n", "train.betas"),
            ("[train]\nsteps = 3\nwarmup_steps = 4\n", "train.warmup_steps"),
            ("[train]\nclip_grad_norm = -1.0\n", "train.clip_grad_norm"),
            ("[weighting]\nweights = { seg = -1.0 }\n", "weighting.weights.seg"),
            ("[weighting]\ndwa_temperature = 0.0\n", "weighting.dwa_temperature"),
        ] {
            let err = parse(extra).unwrap_err();
            assert!(matches!(&err, JobConfigError::Invalid { key: k, .. } if k == key), "{extra}: {err}");
        }
        let err = parse("[weighting]\nstrategy = \"magic\"\n").unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
    }
}
