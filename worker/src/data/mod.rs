//! Training data. Placeholder holding only the batch contract; the data branch replaces it.
pub mod batch;
