//! Counting the LibTorch ops a closure dispatches (through `worker/shim/op_counter.cpp`), and
//! which of them make the host wait for the device: a value read (`item`, `_local_scalar_dense`),
//! an output sized by the data (`nonzero`, `masked_select`), a copy from a device to the host.
//! On a CPU machine this is how the tests see what a GPU training step would do: the kernels
//! it would launch and the points where the GPU would go idle.
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int};
use std::sync::Mutex;

extern "C" {
    fn mtl_opcount_start() -> c_int;
    fn mtl_opcount_stop() -> c_int;
    fn mtl_opcount_report(buf: *mut c_char, cap: usize) -> usize;
}

/// One counting session at a time: the counts live in one process-wide table.
static SESSION: Mutex<()> = Mutex::new(());

/// Calls and host reads per op name.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct OpCounts {
    /// Op name (`aten::add`) → (calls, calls that read from the device).
    pub by_op: BTreeMap<String, (u64, u64)>,
}

impl OpCounts {
    /// All op calls, nested ones included.
    pub(crate) fn ops(&self) -> u64 {
        self.by_op.values().map(|c| c.0).sum()
    }

    /// The ops that made the host wait, with how often.
    pub(crate) fn host_reads(&self) -> Vec<(String, u64)> {
        self.by_op.iter().filter(|(_, c)| c.1 > 0).map(|(n, c)| (n.clone(), c.1)).collect()
    }

    /// Calls of `op`.
    pub(crate) fn calls(&self, op: &str) -> u64 {
        self.by_op.get(op).map_or(0, |c| c.0)
    }
}

/// Runs `f` on this thread and counts the ops it dispatches (and its autograd threads do).
pub(crate) fn count_ops<T>(f: impl FnOnce() -> T) -> (T, OpCounts) {
    let _session = SESSION.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: the shim takes no arguments and catches every C++ exception.
    assert_eq!(unsafe { mtl_opcount_start() }, 0, "the op counter could not start");
    let out = f();
    // SAFETY: as above; stops the callback this thread registered.
    assert_eq!(unsafe { mtl_opcount_stop() }, 0, "the op counter could not stop");
    (out, report())
}

fn report() -> OpCounts {
    // SAFETY: a null buffer of capacity 0 only asks for the length.
    let len = unsafe { mtl_opcount_report(std::ptr::null_mut(), 0) };
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` has room for `len` bytes; the counts do not change between the calls (no
    // counting session is active).
    unsafe { mtl_opcount_report(buf.as_mut_ptr().cast(), buf.len()) };
    let text = String::from_utf8_lossy(&buf);
    let mut by_op = BTreeMap::new();
    for line in text.lines() {
        let mut fields = line.split('\t');
        if let (Some(name), Some(calls), Some(reads)) = (fields.next(), fields.next(), fields.next()) {
            by_op.insert(name.to_string(), (calls.parse().unwrap_or(0), reads.parse().unwrap_or(0)));
        }
    }
    OpCounts { by_op }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn counts_ops_and_the_ones_that_read_values() {
        let a = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let (sum, counts) = count_ops(|| {
            let b = &a + 1.0;
            let total = b.sum(Kind::Float).double_value(&[]);
            let _ = b.gt(1.5).nonzero();
            total
        });
        assert_eq!(sum, 8.0);
        assert!(counts.calls("aten::add") >= 1 && counts.calls("aten::sum") >= 1, "{counts:?}");
        let reads: Vec<String> = counts.host_reads().into_iter().map(|(n, _)| n).collect();
        assert!(reads.contains(&"aten::_local_scalar_dense".to_string()), "{reads:?}");
        assert!(reads.contains(&"aten::nonzero".to_string()), "{reads:?}");
        assert!(!reads.contains(&"aten::add".to_string()));

        // Ops of other threads are not counted; nothing is counted after the session.
        let (_, counts) = count_ops(|| {
            std::thread::spawn(|| {
                Tensor::ones([2], (Kind::Float, Device::Cpu)).sum(Kind::Float).double_value(&[])
            })
            .join()
            .unwrap()
        });
        assert_eq!(counts.calls("aten::_local_scalar_dense"), 0, "{counts:?}");
        let _ = a.sum(Kind::Float).double_value(&[]);
        assert_eq!(report(), counts);
    }
}
