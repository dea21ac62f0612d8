//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong while accumulating, merging or loading statistics.
///
/// Every variant names the thing it is about (which statistics, which id, which
/// file and field), so a coordinator can log it without extra context.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Two statistics (or a statistic and an input) disagree on the number of classes.
    #[error("{what}: num_classes mismatch ({expected} vs {found})")]
    NumClassesMismatch {
        /// Which statistics or input (e.g. "classification merge").
        what: &'static str,
        /// The number of classes of the receiving statistics.
        expected: usize,
        /// The number of classes of the other statistics or input.
        found: usize,
    },
    /// `num_classes` is outside the range the statistics support.
    #[error("{what}: invalid num_classes {num_classes} ({reason})")]
    InvalidNumClasses {
        /// Which statistics.
        what: &'static str,
        /// The rejected value.
        num_classes: usize,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A class index is not below `num_classes`.
    #[error("{what}: class {value} out of range (num_classes = {num_classes})")]
    ClassOutOfRange {
        /// Which input (e.g. "segmentation prediction at pixel 17").
        what: String,
        /// The offending class index.
        value: usize,
        /// The number of classes of the statistics.
        num_classes: usize,
    },
    /// Two inputs that must have the same length do not.
    #[error("{what}: length mismatch ({left} vs {right})")]
    LengthMismatch {
        /// Which inputs (e.g. "segmentation pred/target").
        what: String,
        /// Length of the first input.
        left: usize,
        /// Length of the second input.
        right: usize,
    },
    /// A keyed record (sample, image) was added or merged twice.
    #[error("{what}: duplicate id {id}")]
    DuplicateId {
        /// What kind of id (e.g. "multi-label sample", "detection image").
        what: &'static str,
        /// The duplicated id.
        id: u64,
    },
    /// A score or coordinate is NaN or infinite.
    #[error("{what}: non-finite value {value}")]
    NonFinite {
        /// Where the value was found (e.g. "image 7 detection 2 score").
        what: String,
        /// The offending value.
        value: f64,
    },
    /// Two detection statistics were built for different category sets.
    #[error("detection merge: category ids differ ({left:?} vs {right:?})")]
    CategoryMismatch {
        /// Category ids of the receiving statistics.
        left: Vec<u64>,
        /// Category ids of the other statistics.
        right: Vec<u64>,
    },
    /// A file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file is not valid JSON.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying parse error.
        source: serde_json::Error,
    },
    /// A JSON file parsed but a field is missing or has the wrong shape.
    #[error("{}: {field}: {message}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// JSON path of the field, e.g. `annotations[3].bbox`.
        field: String,
        /// What is wrong with it, e.g. "expected 4 numbers".
        message: String,
    },
    /// A results file refers to an image that is not in the ground truth.
    #[error("{}: {field}: image id {image_id} is not in the ground truth", path.display())]
    UnknownImage {
        /// The results file.
        path: PathBuf,
        /// JSON path of the result, e.g. `[12].image_id`.
        field: String,
        /// The unknown image id.
        image_id: u64,
    },
}
