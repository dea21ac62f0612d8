//! One flat, persistent gradient buffer (PyTorch DDP's `gradient_as_bucket_view`): every
//! gradient the step all-reduces is a view into it, so the all-reduce takes slices of one buffer
//! (on NCCL in place: no `cat` into buckets, no copy back), zeroing is one op and clipping two.
//! Autograd accumulates into a defined gradient in place, so the views stay the gradients.
use tch::{Kind, Tensor};

use crate::optim::set_grad;
use crate::WorkerError;

/// The buffer and where its parts are: `[shared trunk | heads | learnable task weights]`.
#[derive(Debug)]
pub(crate) struct FlatGrads {
    flat: Tensor,
    /// Elements of the shared trunk's gradients (at the start).
    shared: i64,
    /// Elements of the model's gradients (shared and heads), before the task weights'.
    model: i64,
}

impl FlatGrads {
    /// Makes the gradients of `shared`, `heads` and `weighting` (in this order) views of one
    /// zeroed buffer. `None` when they do not share one floating dtype and device or one is not
    /// dense (then autograd allocates each gradient, as before).
    pub(crate) fn new(
        shared: &[Tensor],
        heads: &[Tensor],
        weighting: &[Tensor],
    ) -> Result<Option<Self>, WorkerError> {
        let params: Vec<&Tensor> = shared.iter().chain(heads).chain(weighting).collect();
        let Some(first) = params.first() else { return Ok(None) };
        let (kind, device) = (first.kind(), first.device());
        let dense = |p: &Tensor| {
            let span: i64 = p.size().iter().zip(p.stride()).map(|(&n, s)| (n - 1).max(0) * s).sum();
            p.numel() == 0 || span + 1 == p.numel() as i64
        };
        let usable = matches!(kind, Kind::Float | Kind::Double)
            && params.iter().all(|p| p.kind() == kind && p.device() == device && dense(p));
        if !usable {
            return Ok(None);
        }
        let elements = |ps: &[Tensor]| ps.iter().map(|p| p.numel() as i64).sum::<i64>();
        let (shared_n, model_n) = (elements(shared), elements(shared) + elements(heads));
        let flat = Tensor::f_zeros([model_n + elements(weighting)], (kind, device))?;
        let mut offset = 0;
        for p in params {
            let view = flat.f_as_strided(p.size(), p.stride(), Some(offset))?;
            set_grad(p, &view)?;
            offset += p.numel() as i64;
        }
        Ok(Some(FlatGrads { flat, shared: shared_n, model: model_n }))
    }

    /// The whole buffer.
    pub(crate) fn buffer(&self) -> &Tensor {
        &self.flat
    }

    /// Zeroes every gradient.
    pub(crate) fn zero(&mut self) -> Result<(), WorkerError> {
        let _ = self.flat.f_zero_()?;
        Ok(())
    }

    /// The gradients to all-reduce: all of them, or all but the shared trunk's.
    pub(crate) fn to_reduce(&self, skip_shared: bool) -> Result<Tensor, WorkerError> {
        let start = if skip_shared { self.shared } else { 0 };
        Ok(self.flat.f_narrow(0, start, self.flat.size()[0] - start)?)
    }

    /// The model's gradients (what clipping scales), without the task weights'.
    pub(crate) fn model(&self) -> Result<Tensor, WorkerError> {
        Ok(self.flat.f_narrow(0, 0, self.model)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn gradients_are_views_of_the_buffer_and_backward_accumulates_into_them() {
        let p = |shape: &[i64]| Tensor::ones(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let (a, b, c) = (p(&[2, 3]), p(&[4]), p(&[3]));
        let mut flat = FlatGrads::new(&[a.shallow_clone()], &[b.shallow_clone()], &[c.shallow_clone()])
            .unwrap()
            .expect("one dtype and device");
        let loss = || (&a * 2.0).sum(Kind::Float) + (&b * 3.0).sum(Kind::Float) + (&c * 5.0).sum(Kind::Float);
        loss().backward();
        loss().backward();
        let want: Vec<f32> = [vec![4.0; 6], vec![6.0; 4], vec![10.0; 3]].concat();
        assert_eq!(
            Vec::<f32>::try_from(&flat.to_reduce(false).unwrap()).unwrap(),
            want,
            "accumulated in place"
        );
        assert_eq!(flat.to_reduce(true).unwrap().size(), [7], "without the shared trunk");
        assert_eq!(flat.model().unwrap().size(), [10], "without the task weights");
        let _ = flat.to_reduce(false).unwrap().f_mul_scalar_(0.5).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&a.grad().reshape([-1])).unwrap(),
            vec![2.0; 6],
            "the grads are views"
        );
        flat.zero().unwrap();
        assert_eq!(b.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
        let mixed = Tensor::ones([2], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        assert!(FlatGrads::new(&[a.shallow_clone()], &[mixed], &[]).unwrap().is_none());
    }
}
