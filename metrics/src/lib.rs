//! Metric math (placeholder until the metrics module lands).
