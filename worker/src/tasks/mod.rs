//! Task heads and their masked losses: [`classification`], [`detection`] (FCOS, with
//! [`fcos_targets`] and [`decode`]) and [`segmentation`]. Each loss is a SUM over the labelled
//! samples of the local batch divided by a normaliser passed in; `train::losses` assembles them
//! for a step.
pub mod classification;
pub mod decode;
pub mod detection;
pub mod fcos_targets;
pub mod segmentation;

#[cfg(test)]
pub(crate) mod tests;
