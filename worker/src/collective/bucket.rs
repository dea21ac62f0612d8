//! Packing many tensors into few large buffers: collectives move flat buckets of about
//! `comm.bucket_bytes`, not one message per parameter.
use tch::Tensor;

use super::CollectiveError;

/// Groups tensors (by index) into buckets of at most `bucket_bytes` each (a tensor larger
/// than that gets a bucket of its own), in order, all of one dtype.
pub(crate) fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        if i > start && (bytes + size > bucket_bytes || t.kind() != tensors[start].kind()) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

/// Copies consecutive pieces of `flat` back into the tensors it was packed from.
pub(crate) fn scatter_back(group: &mut [Tensor], flat: &Tensor) -> Result<(), CollectiveError> {
    let _guard = tch::no_grad_guard();
    let mut offset = 0;
    for t in group.iter_mut() {
        let n = t.numel() as i64;
        let piece = flat.f_narrow(0, offset, n)?.f_view(t.size().as_slice())?;
        t.f_copy_(&piece)?;
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn buckets_respect_size_and_dtype() {
        let t = |n: i64, kind| Tensor::zeros([n], (kind, tch::Device::Cpu));
        let ts = [
            t(10, Kind::Float),
            t(10, Kind::Float),
            t(100, Kind::Float),
            t(5, Kind::Double),
            t(1, Kind::Float),
        ];
        assert_eq!(buckets(&ts, 80), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(buckets(&ts, 1 << 20), vec![0..3, 3..4, 4..5]);
        assert!(buckets(&[], 10).is_empty());
    }
}
