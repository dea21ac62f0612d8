//! The CPU ring backend for tensors: each bucket is reduced by [`Ring`] in place when it is one
//! contiguous tensor (the flat gradient buffer), else packed into one flat f32/f64 buffer.
use tch::{Kind, Tensor};

use super::bucket::{buckets, scatter_back};
use super::ring::Ring;
use super::{Collective, CollectiveError, ReduceOp};

/// The CPU ring backend for tensors (see the module docs).
pub(crate) struct RingCollective {
    ring: Ring,
    bucket_bytes: usize,
}

impl RingCollective {
    /// Wraps a connected ring.
    pub(crate) fn new(ring: Ring, bucket_bytes: usize) -> Self {
        Self { ring, bucket_bytes: bucket_bytes.max(1) }
    }

    fn each_bucket(
        &mut self,
        tensors: &mut [Tensor],
        op: &'static str,
        mut f: impl FnMut(&mut Ring, Flat<'_>) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        // Checked in a world of one too, so a misconfigured job fails the same way at any size.
        for t in tensors.iter() {
            if t.device() != tch::Device::Cpu || !matches!(t.kind(), Kind::Float | Kind::Double) {
                return Err(CollectiveError::Unsupported {
                    op,
                    message: format!(
                        "the ring backend takes CPU f32/f64 tensors, got {:?} {:?}",
                        t.device(),
                        t.kind()
                    ),
                });
            }
        }
        if self.ring.world_size() == 1 {
            return Ok(());
        }
        for range in buckets(tensors, self.bucket_bytes) {
            let group = &mut tensors[range];
            // A bucket that is one contiguous tensor (a flat gradient buffer, or a slice of
            // one) is reduced in place, in the tensor's own memory: no packing, no copy back.
            if let [t] = group {
                if t.is_contiguous() {
                    // SAFETY: a contiguous CPU tensor of `numel` elements of the matched dtype
                    // (checked above) starts at `data_ptr`; nothing else touches it during the
                    // call, which holds `&mut` to it.
                    let numel = t.numel();
                    if numel > 0 {
                        match t.kind() {
                            Kind::Double => f(&mut self.ring, Flat::F64(unsafe { tensor_slice(t, numel) }))?,
                            _ => f(&mut self.ring, Flat::F32(unsafe { tensor_slice(t, numel) }))?,
                        }
                    }
                    continue;
                }
            }
            let flat =
                Tensor::f_cat(&group.iter().map(|t| t.f_reshape([-1])).collect::<Result<Vec<_>, _>>()?, 0)?;
            let numel = flat.numel();
            match flat.kind() {
                Kind::Double => {
                    let mut buf = vec![0f64; numel];
                    flat.f_copy_data(&mut buf, numel)?;
                    f(&mut self.ring, Flat::F64(&mut buf))?;
                    scatter_back(group, &Tensor::from_slice(&buf))?;
                }
                _ => {
                    let mut buf = vec![0f32; numel];
                    flat.f_copy_data(&mut buf, numel)?;
                    f(&mut self.ring, Flat::F32(&mut buf))?;
                    scatter_back(group, &Tensor::from_slice(&buf))?;
                }
            }
        }
        Ok(())
    }
}

/// The elements of a contiguous CPU tensor as a mutable slice.
///
/// # Safety
/// `t` must be contiguous, on the CPU, hold `numel > 0` elements of type `T`, and not be read
/// or written elsewhere while the slice lives.
unsafe fn tensor_slice<T>(t: &mut Tensor, numel: usize) -> &mut [T] {
    std::slice::from_raw_parts_mut(t.data_ptr().cast::<T>(), numel)
}

enum Flat<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

impl Collective for RingCollective {
    fn world_size(&self) -> usize {
        self.ring.world_size()
    }

    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError> {
        self.each_bucket(tensors, "all_reduce", |ring, flat| match flat {
            Flat::F32(b) => ring.all_reduce(b, op),
            Flat::F64(b) => ring.all_reduce(b, op),
        })
    }

    fn broadcast(&mut self, tensors: &mut [Tensor], root: usize) -> Result<(), CollectiveError> {
        self.each_bucket(tensors, "broadcast", |ring, flat| match flat {
            Flat::F32(b) => ring.broadcast(b, root),
            Flat::F64(b) => ring.broadcast(b, root),
        })
    }

    fn overlaps_backward(&self) -> bool {
        true
    }

    #[cfg(test)]
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.ring.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener};
    use std::time::Duration;

    #[test]
    fn ring_collective_reduces_tensors_of_mixed_shapes_and_dtypes() {
        let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let results: Vec<Vec<Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = &addrs;
                    s.spawn(move || {
                        let t = Duration::from_secs(20);
                        let ring = Ring::for_tests(rank, addrs, l, t);
                        let mut c = RingCollective::new(ring, 64);
                        let r = rank as f64;
                        let mut ts = vec![
                            Tensor::full([2, 3], r, (Kind::Float, tch::Device::Cpu)),
                            Tensor::full([0], r, (Kind::Float, tch::Device::Cpu)),
                            Tensor::full([7], r + 0.5, (Kind::Double, tch::Device::Cpu)),
                            Tensor::arange(40, (Kind::Float, tch::Device::Cpu)) * (r + 1.0),
                            // Not contiguous: packed into a buffer and copied back.
                            (Tensor::arange(12, (Kind::Float, tch::Device::Cpu)) * (r + 1.0))
                                .view([3, 4])
                                .tr(),
                        ];
                        c.all_reduce(&mut ts, ReduceOp::Mean).unwrap();
                        let mut b = vec![Tensor::full([3], r, (Kind::Float, tch::Device::Cpu))];
                        c.broadcast(&mut b, 2).unwrap();
                        ts.extend(b);
                        ts
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ts in &results {
            assert_eq!(ts[0], Tensor::full([2, 3], 1.0, (Kind::Float, tch::Device::Cpu)));
            assert_eq!(ts[1].numel(), 0);
            assert_eq!(ts[2], Tensor::full([7], 1.5, (Kind::Double, tch::Device::Cpu)));
            assert_eq!(ts[3], Tensor::arange(40, (Kind::Float, tch::Device::Cpu)) * 2.0);
            assert_eq!(ts[4], (Tensor::arange(12, (Kind::Float, tch::Device::Cpu)) * 2.0).view([3, 4]).tr());
            assert_eq!(ts[5], Tensor::full([3], 2.0, (Kind::Float, tch::Device::Cpu)));
        }
    }

    #[test]
    fn unsupported_tensors_are_refused_even_in_a_world_of_one() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_secs(1);
        let mut c = RingCollective::new(Ring::for_tests(0, &[addr], l, t), 64);
        let mut ts = vec![Tensor::zeros([2], (Kind::Int64, tch::Device::Cpu))];
        let err = c.all_reduce(&mut ts, ReduceOp::Sum).unwrap_err();
        assert!(err.to_string().contains("f32/f64"), "{err}");
    }
}
