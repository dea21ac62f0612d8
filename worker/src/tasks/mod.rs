//! Task heads and their masked losses: [`classification`], [`detection`] (FCOS, with
//! [`fcos_targets`] and [`decode`]) and [`segmentation`]. Each loss is a SUM over the labelled
//! samples of the local batch divided by a normaliser passed in; `train::losses` assembles them
//! for a step.
pub(crate) mod classification;
pub(crate) mod decode;
pub(crate) mod detection;
pub(crate) mod fcos_targets;
pub(crate) mod segmentation;

#[cfg(test)]
pub(crate) mod tests;
