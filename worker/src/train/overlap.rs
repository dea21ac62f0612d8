//! The gradient all-reduce overlapped with backward, as PyTorch DDP's reducer does it: the flat
//! gradient buffer ([`super::flat_grads`]) is cut into buckets of about `comm.bucket_bytes`,
//! formed over the parameters in reverse order (backward reaches the heads and the last layers
//! first); a post-accumulate-grad hook on every parameter (`worker/shim/grad_hooks.cpp`) tells
//! when autograd has accumulated its gradient, and a communication thread all-reduces each
//! bucket once all of its parameters' hooks have fired, while backward goes on.
//!
//! The thread reduces the buckets strictly in one fixed order (highest offset first), the same
//! on every rank, so the ranks' collective calls match whatever order their hooks fire in. A
//! parameter that gets no gradient in a step (one no loss of the step uses; a task without
//! labels still gives its head a zero gradient) never fires: its bucket is marked ready when
//! backward returns and its zero gradient is reduced then, as without overlap. When backward
//! fails the thread stops before its next bucket. When the step may use this is decided in
//! `Trainer::plan_overlap` (docs/ARCHITECTURE.md).
use std::ffi::{c_char, c_int, c_void};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::collective::{Collective, ReduceOp};
use crate::{shim, WorkerError};

extern "C" {
    fn mtl_set_post_acc_grad_hook(
        param: *const C_tensor,
        call: extern "C" fn(*mut c_void, usize),
        release: extern "C" fn(*mut c_void),
        ctx: *mut c_void,
        index: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn mtl_clear_post_acc_grad_hook(param: *const C_tensor, err: *mut c_char, err_len: usize) -> c_int;
}

/// The parameters' hooks, the buckets and the thread that reduces them during backward.
pub(crate) struct Overlap {
    /// What the hooks, the communication thread and the step share (each hook owns a reference).
    shared: Arc<Shared>,
    /// The hooked parameters, whose hooks are removed on drop.
    params: Vec<Tensor>,
    /// Views of the flat gradient buffer, one per bucket, in the order they are reduced.
    buckets: Vec<Tensor>,
}

/// The bucket of each parameter and the progress of the current step.
struct Shared {
    /// Bucket (index in the reduce order) of each parameter.
    bucket_of: Vec<usize>,
    /// Parameters per bucket.
    sizes: Vec<usize>,
    progress: Mutex<Progress>,
    /// Signalled whenever `progress` changes.
    changed: Condvar,
}

/// Where the current step is.
#[derive(Default)]
struct Progress {
    /// Inside an overlapped backward: hooks count (other backward passes are ignored).
    armed: bool,
    /// Backward has returned and every bucket is ready.
    backward_done: bool,
    /// Backward failed: the thread reduces nothing more.
    abort: bool,
    /// Hook calls in this step.
    calls: usize,
    /// Whether each parameter's hook fired in this step.
    fired: Vec<bool>,
    /// Per bucket: its parameters whose hooks have not fired yet.
    missing: Vec<usize>,
    /// Per bucket: whether backward was still running when its all-reduce started.
    during_backward: Vec<bool>,
    /// Buckets the thread has reduced in this step.
    reduced: usize,
    /// The communication thread has not returned yet.
    comm_running: bool,
    /// Tests only: a hook that completes a bucket waits until the thread has reduced every
    /// bucket that is ready in order, which makes "reduced during backward" an ordering fact.
    #[cfg(test)]
    hold: bool,
}

impl Progress {
    /// Buckets ready in reduce order, from the first.
    #[cfg(test)]
    fn ready_prefix(&self) -> usize {
        self.missing.iter().take_while(|&&m| m == 0).count()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        // Every update leaves `Progress` consistent: a panic elsewhere cannot leave it half-done.
        self.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A hook fired: parameter `index`'s gradient is accumulated.
    fn accumulated(&self, index: usize) {
        let mut p = self.lock();
        if !p.armed {
            return;
        }
        p.calls += 1;
        if p.fired[index] {
            return;
        }
        p.fired[index] = true;
        let bucket = self.bucket_of[index];
        p.missing[bucket] -= 1;
        if p.missing[bucket] > 0 {
            return;
        }
        self.changed.notify_all();
        #[cfg(test)]
        if p.hold {
            while p.comm_running && p.reduced < p.ready_prefix() {
                p = self.changed.wait(p).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
    }

    /// Waits until bucket `i` is ready; `None` when the step was aborted. Records whether
    /// backward was still running.
    fn wait_ready(&self, i: usize) -> Option<()> {
        let mut p = self.lock();
        loop {
            if p.abort {
                return None;
            }
            if p.missing[i] == 0 {
                p.during_backward[i] = !p.backward_done;
                return Some(());
            }
            p = self.changed.wait(p).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn set(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// Called by a parameter's hook (on autograd's thread) with its context and index.
extern "C" fn on_accumulated(ctx: *mut c_void, index: usize) {
    // SAFETY: `ctx` is the `Arc<Shared>` reference the calling hook owns (see `Overlap::new`).
    let shared = unsafe { &*ctx.cast::<Shared>() };
    shared.accumulated(index);
}

/// Called when a hook is destroyed: gives back its reference to the context.
extern "C" fn release(ctx: *mut c_void) {
    // SAFETY: `ctx` came from `Arc::into_raw` once for this hook, and is released once.
    drop(unsafe { Arc::from_raw(ctx.cast::<Shared>().cast_const()) });
}

/// Buckets over parameters of `numels` elements of `elt_bytes` each, laid out one after the
/// other: walking from the last parameter back, a bucket closes before the parameter that would
/// take it past `bucket_bytes` (a larger parameter gets a bucket of its own). Returns each
/// bucket's parameters, highest offset first.
fn plan(numels: &[usize], elt_bytes: usize, bucket_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut end = numels.len();
    let mut bytes = 0;
    for i in (0..numels.len()).rev() {
        let size = numels[i] * elt_bytes;
        if i + 1 < end && bytes + size > bucket_bytes {
            out.push(i + 1..end);
            end = i + 1;
            bytes = 0;
        }
        bytes += size;
    }
    if end > 0 {
        out.push(0..end);
    }
    out
}

impl Overlap {
    /// Hooks `params`, whose gradients lie one after the other in `flat` (in this order, as
    /// [`super::flat_grads::FlatGrads`] lays them out), and plans the buckets.
    pub(crate) fn new(params: &[Tensor], flat: &Tensor, bucket_bytes: usize) -> Result<Self, WorkerError> {
        let numels: Vec<usize> = params.iter().map(Tensor::numel).collect();
        let starts: Vec<usize> =
            numels.iter().scan(0, |at, n| Some(std::mem::replace(at, *at + n))).collect();
        let ranges = plan(&numels, flat.kind().elt_size_in_bytes(), bucket_bytes.max(1));
        let mut bucket_of = vec![0; params.len()];
        for (b, r) in ranges.iter().enumerate() {
            bucket_of[r.clone()].fill(b);
        }
        let buckets = ranges
            .iter()
            .map(|r| {
                let start = starts[r.start];
                let len = starts[r.end - 1] + numels[r.end - 1] - start;
                flat.f_narrow(0, start as i64, len as i64)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            bucket_of,
            sizes: ranges.iter().map(ExactSizeIterator::len).collect(),
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
        });
        let mut overlap = Overlap { shared, params: Vec::with_capacity(params.len()), buckets };
        for (index, p) in params.iter().enumerate() {
            let ctx = Arc::into_raw(Arc::clone(&overlap.shared)).cast_mut().cast::<c_void>();
            shim::call(|err, len| {
                // SAFETY: `p` is a live tensor; the hook takes over the reference `ctx` (the shim
                // releases it on failure too).
                unsafe {
                    mtl_set_post_acc_grad_hook(p.as_ptr(), on_accumulated, release, ctx, index, err, len)
                }
            })?;
            // On an error above, drop removes the hooks set so far.
            overlap.params.push(p.shallow_clone());
        }
        Ok(overlap)
    }

    /// Buckets, in the order they are reduced.
    #[cfg(test)]
    pub(crate) fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Runs `backward` while a communication thread all-reduces (mean) each bucket through
    /// `collective` as soon as it is ready, then the buckets backward gave no gradient. Returns
    /// `backward`'s result, or the first error: backward's, else the all-reduce's.
    pub(crate) fn backward<T>(
        &mut self,
        collective: &mut dyn Collective,
        backward: impl FnOnce() -> Result<T, WorkerError>,
    ) -> Result<T, WorkerError> {
        let shared = &*self.shared;
        shared.set(|p| {
            p.armed = true;
            p.backward_done = false;
            p.abort = false;
            p.calls = 0;
            p.fired = vec![false; shared.bucket_of.len()];
            p.missing = shared.sizes.clone();
            p.during_backward = vec![false; shared.sizes.len()];
            p.reduced = 0;
            p.comm_running = true;
        });
        let buckets = &mut self.buckets;
        std::thread::scope(|s| {
            let comm = s.spawn(move || {
                let _stopped = OnDrop(|| shared.set(|p| p.comm_running = false));
                for (i, bucket) in buckets.iter_mut().enumerate() {
                    if shared.wait_ready(i).is_none() {
                        break;
                    }
                    collective.all_reduce(std::slice::from_mut(bucket), ReduceOp::Mean)?;
                    shared.set(|p| p.reduced = i + 1);
                }
                Ok::<_, WorkerError>(())
            });
            // Also when backward panics: the thread must not wait for buckets forever.
            let ok = std::cell::Cell::new(false);
            let finish = OnDrop(|| {
                shared.set(|p| {
                    p.armed = false;
                    if ok.get() {
                        p.missing.fill(0);
                        p.backward_done = true;
                    } else {
                        p.abort = true;
                    }
                })
            });
            let result = backward();
            ok.set(result.is_ok());
            drop(finish);
            let reduced = comm.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let value = result?;
            reduced?;
            Ok(value)
        })
    }

    /// Per bucket, in reduce order: whether its all-reduce started while backward was still
    /// running, in the last step.
    #[cfg(test)]
    pub(crate) fn reduced_during_backward(&self) -> Vec<bool> {
        self.shared.lock().during_backward.clone()
    }

    /// Tests only: from now on, a hook that completes a bucket waits until the thread has
    /// reduced the buckets ready in order (see [`Progress::hold`]).
    #[cfg(test)]
    pub(crate) fn hold_backward_for_reduces(&self) {
        self.shared.lock().hold = true;
    }
}

impl Drop for Overlap {
    fn drop(&mut self) {
        for p in &self.params {
            // SAFETY: `p` is a live tensor. A failure leaves the hook in place, which keeps its
            // own reference to the context: nothing dangles.
            let _ = shim::call(|err, len| unsafe { mtl_clear_post_acc_grad_hook(p.as_ptr(), err, len) });
        }
    }
}

/// Runs a closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::LocalCollective;
    use tch::{Device, Kind};

    #[test]
    fn buckets_are_planned_from_the_last_parameter_back() {
        assert_eq!(plan(&[2, 2, 2, 2], 4, 16), vec![2..4, 0..2]);
        assert_eq!(plan(&[2, 10, 1, 1], 4, 16), vec![2..4, 1..2, 0..1], "a large one alone");
        assert_eq!(plan(&[3, 1], 4, 1 << 20), vec![0..2]);
        assert!(plan(&[], 4, 16).is_empty());
    }

    #[test]
    fn hooks_fire_once_per_backward_and_never_for_a_parameter_without_a_gradient() {
        let p = |n: i64| Tensor::ones([n], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = [p(2), p(3), p(4)];
        let flat = Tensor::zeros([9], (Kind::Float, Device::Cpu));
        let mut offset = 0;
        for q in &params {
            let n = q.numel() as i64;
            crate::optim::set_grad(q, &flat.narrow(0, offset, n)).unwrap();
            offset += n;
        }
        // One bucket per parameter: [2], [1], [0] in reduce order.
        let mut overlap = Overlap::new(&params, &flat, 4).unwrap();
        assert_eq!(overlap.bucket_count(), 3);
        let used = || (&params[0] * 2.0).sum(Kind::Float) + (&params[2] * 3.0).sum(Kind::Float);
        let fired = |o: &Overlap| {
            let p = o.shared.lock();
            (p.calls, p.fired.clone())
        };
        overlap.backward(&mut LocalCollective, || Ok(used().f_backward()?)).unwrap();
        assert_eq!(fired(&overlap), (2, vec![true, false, true]), "no hook for the unused parameter");
        // Used twice in one graph: autograd sums both contributions, then accumulates once.
        overlap.backward(&mut LocalCollective, || Ok((used() + used()).f_backward()?)).unwrap();
        assert_eq!(fired(&overlap), (2, vec![true, false, true]));
        assert_eq!(
            Vec::<f32>::try_from(&flat).unwrap(),
            [[6.0; 2].as_slice(), &[0.0; 3], &[9.0; 4]].concat()
        );
        // Outside an overlapped step the hooks fire but count nothing.
        used().backward();
        assert_eq!(fired(&overlap).0, 2, "not counted");

        // A failed backward stops the thread instead of leaving it waiting.
        let err = overlap
            .backward(&mut LocalCollective, || -> Result<(), WorkerError> {
                Err(WorkerError::Torch(tch::TchError::Torch("backward failed".into())))
            })
            .unwrap_err();
        assert!(err.to_string().contains("backward failed"), "{err}");

        // Dropping removes the hooks and, with them, every reference to the context.
        let weak = Arc::downgrade(&overlap.shared);
        drop(overlap);
        assert!(weak.upgrade().is_none(), "the hooks gave their references back");
        used().backward();
        let again = Overlap::new(&params, &flat, 4).unwrap();
        assert_eq!(again.bucket_count(), 3, "the parameters can be hooked again");
    }
}
