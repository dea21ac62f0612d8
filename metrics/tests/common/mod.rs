//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use mtl_job::splitmix::SplitMix64;
use mtl_metrics::DetectionStats;
use serde_json::Value;

/// Path of a file in `metrics/fixtures`.
pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// Parsed JSON fixture.
pub(crate) fn read_fixture(name: &str) -> Value {
    let bytes = std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_slice(&bytes).unwrap()
}

/// Asserts bit equality (NaN == NaN), printing both values and their difference.
pub(crate) fn assert_bits(actual: f64, expected: f64, what: &str) {
    let same = actual.to_bits() == expected.to_bits() || (actual.is_nan() && expected.is_nan());
    assert!(same, "{what}: got {actual:?}, expected {expected:?} (diff {:e})", actual - expected);
}

/// JSON round trip through the wire format.
pub(crate) fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    serde_json::from_slice(&serde_json::to_vec(value).unwrap()).unwrap()
}

/// Splits detection statistics into shards: image `n` (in id order) goes to
/// shard `assign(n)`.
pub(crate) fn split_detection(
    stats: &DetectionStats,
    shards: usize,
    mut assign: impl FnMut(usize) -> usize,
) -> Vec<DetectionStats> {
    let mut out: Vec<DetectionStats> =
        (0..shards).map(|_| DetectionStats::new(stats.category_ids().iter().copied())).collect();
    for (n, (id, record)) in stats.images().iter().enumerate() {
        out[assign(n) % shards]
            .add_image(*id, record.ground_truth.clone(), record.detections.clone())
            .unwrap();
    }
    out
}

/// The project's seeded generator, with the draws these tests use.
pub(crate) struct Rng(SplitMix64);

impl Rng {
    /// A stream from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }

    /// Uniform index below `n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }

    /// Fisher-Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        self.0.shuffle(items);
    }
}
