//! The task vocabulary every module shares: [`Task`] names one of the three tasks and
//! [`PerTask`] holds one value per task (a loss tensor, a weight, a logged number), absent where
//! the task is off or has nothing this step.
use tch::Tensor;

/// One of the tasks the network can be trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// Image-level classification.
    Classification,
    /// Object detection.
    Detection,
    /// Semantic segmentation.
    Segmentation,
}

impl Task {
    /// All tasks, in the fixed order used for state tensors and reductions.
    pub const ALL: [Task; 3] = [Task::Classification, Task::Detection, Task::Segmentation];

    /// Position in [`Task::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The task's name as used in `[tasks]`, variable names and metric keys.
    pub fn name(self) -> &'static str {
        ["classification", "detection", "segmentation"][self.index()]
    }

    /// The short form used in `[weighting.weights]` and in log keys (`loss/cls`).
    pub fn short(self) -> &'static str {
        ["cls", "det", "seg"][self.index()]
    }
}

/// One value per task, `None` where the task is absent.
#[derive(Debug, Clone, PartialEq)]
pub struct PerTask<T> {
    /// Classification.
    pub cls: Option<T>,
    /// Detection.
    pub det: Option<T>,
    /// Segmentation.
    pub seg: Option<T>,
}

impl<T> Default for PerTask<T> {
    fn default() -> Self {
        Self { cls: None, det: None, seg: None }
    }
}

impl<T> PerTask<T> {
    /// The value of `task`, if present.
    pub fn get(&self, task: Task) -> Option<&T> {
        match task {
            Task::Classification => self.cls.as_ref(),
            Task::Detection => self.det.as_ref(),
            Task::Segmentation => self.seg.as_ref(),
        }
    }

    /// Sets the value of `task`.
    pub fn set(&mut self, task: Task, value: T) {
        let slot = match task {
            Task::Classification => &mut self.cls,
            Task::Detection => &mut self.det,
            Task::Segmentation => &mut self.seg,
        };
        *slot = Some(value);
    }

    /// Present tasks with their values, in [`Task::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Task, &T)> {
        Task::ALL.into_iter().filter_map(|t| self.get(t).map(|v| (t, v)))
    }

    /// Present tasks with their values, collected.
    pub fn present(&self) -> Vec<(Task, &T)> {
        self.iter().collect()
    }

    /// Applies `f` to every present value.
    pub fn map<U>(self, mut f: impl FnMut(Task, T) -> U) -> PerTask<U> {
        PerTask {
            cls: self.cls.map(|v| f(Task::Classification, v)),
            det: self.det.map(|v| f(Task::Detection, v)),
            seg: self.seg.map(|v| f(Task::Segmentation, v)),
        }
    }
}

impl<T: Copy> PerTask<T> {
    /// The value of `task`, copied.
    pub fn value(&self, task: Task) -> Option<T> {
        self.get(task).copied()
    }
}

/// The scalar loss of each task in one step. In data-parallel training a task must be present
/// on all ranks or on none (a rank without labelled samples passes a zero loss).
pub(crate) type TaskLosses = PerTask<Tensor>;

/// One number per task (losses, weights), `None` where the task is absent.
pub type TaskValues = PerTask<f64>;
