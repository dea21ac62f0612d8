//! The gradient all-reduce overlapped with backward (`comm.overlap`, train/overlap.rs) over the
//! real ring: it trains what the all-reduce after backward trains, it does reduce buckets while
//! backward runs, and a peer lost in the middle fails the step.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;
use crate::collective::CollectiveError;

/// Partial labels (steps where a rank, or both, have no labels of a task), a parameter that
/// never gets a gradient, and uncertainty weighting (whose log-variances share the flat buffer):
/// two ranks reducing during backward end exactly where two ranks reducing after it do. Exact,
/// not within a tolerance: with two ranks every reduced element is `(a + b) / 2` whichever
/// bucket or thread reduces it, and each rank's backward is the same computation either way.
#[test]
fn overlapped_and_plain_gradient_reduction_train_the_same_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = job(dir.path(), "[weighting]\nstrategy = \"uncertainty\"");
    open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap(); // generate once
    make_partial(dir.path());
    let info = open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap().info;
    let model = job::job_model(&cfg, &info, Device::Cpu).unwrap();
    let setup = RankSetup { unused_param: true, hold_for_reduces: true };
    let overlapped = train_ranks_with(&cfg, &model, 2, 2, setup);
    cfg.comm.overlap = false;
    let plain = train_ranks_with(&cfg, &model, 2, 2, setup);

    let initial = model.parameters();
    let moved = plain[0].params.iter().zip(&initial).any(|((_, a), (_, i))| !a.equal(i));
    assert!(moved, "training changed the parameters");
    for (rank, (a, b)) in overlapped.iter().zip(&plain).enumerate() {
        assert_eq!(a.params.len(), b.params.len());
        for ((name, x), (_, y)) in a.params.iter().zip(&b.params) {
            assert!(x.equal(y), "rank {rank}: {name} differs with overlap");
        }
        assert!(a.params.iter().any(|(name, _)| name == UNUSED), "the unused parameter is trained");
        assert_eq!(a.losses, b.losses, "rank {rank}: the reported losses");
    }

    // Ordering facts, not timings. With the hooks holding backward until the thread caught up,
    // the first buckets (the heads' last parameters) were reduced before backward returned;
    // the bucket of the parameter without a gradient, and every later one, only after.
    assert_eq!(overlapped[0].overlapped.len(), STEPS as usize);
    eprintln!("reduced during backward, per bucket: {:?}", overlapped[0].overlapped);
    for (step, during) in overlapped[0].overlapped.iter().enumerate() {
        assert!(during.len() >= 4, "step {step}: {} buckets", during.len());
        assert!(during[0], "step {step}: the first bucket waited for the end of backward: {during:?}");
        assert!(during.contains(&false), "step {step}: the unused parameter's bucket went early: {during:?}");
        let first_after = during.iter().position(|&d| !d).unwrap();
        assert!(during[first_after..].iter().all(|&d| !d), "in order: {during:?}");
    }
    assert!(plain.iter().all(|t| t.overlapped.is_empty()), "comm.overlap = false reduces after backward");
}

/// A rank's collective that counts its all-reduces and dies at number `at`: it closes its ring
/// connections, as a killed process would, and fails.
struct DiesAt {
    ring: Option<RingCollective>,
    all_reduces: Arc<AtomicUsize>,
    at: usize,
}

impl Collective for DiesAt {
    fn world_size(&self) -> usize {
        2
    }

    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError> {
        if self.all_reduces.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
            self.ring = None;
        }
        match &mut self.ring {
            Some(ring) => ring.all_reduce(tensors, op),
            None => Err(CollectiveError::Unsupported { op: "all_reduce", message: "this rank died".into() }),
        }
    }

    fn broadcast(&mut self, tensors: &mut [Tensor], root: usize) -> Result<(), CollectiveError> {
        self.ring.as_mut().expect("alive").broadcast(tensors, root)
    }

    fn overlaps_backward(&self) -> bool {
        true
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.ring.as_mut().expect("alive").barrier()
    }
}

#[test]
fn a_peer_lost_during_an_overlapped_backward_fails_the_step_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "");
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap());
    let initial = job::job_model(&cfg, &train.dataset.info, Device::Cpu).unwrap();
    let listeners: Vec<TcpListener> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let counts: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    let models: Vec<MultiTaskModel> = (0..2)
        .map(|_| {
            let mut m = job::job_model(&cfg, &train.dataset.info, Device::Cpu).unwrap();
            m.var_store_mut().copy(initial.var_store()).unwrap();
            m
        })
        .collect();
    let results: Vec<Result<StepReport, WorkerError>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .zip(models)
            .enumerate()
            .map(|(rank, (listener, model))| {
                let (cfg, train, addrs, count) = (&cfg, &train, &addrs, counts[rank].clone());
                s.spawn(move || {
                    let ring = Ring::for_tests(rank, addrs, listener, Duration::from_secs(60));
                    // Rank 1 dies at its second all-reduce: the first gradient bucket (the
                    // first is the step's counts).
                    let at = if rank == 1 { 2 } else { usize::MAX };
                    let ring = Some(RingCollective::new(ring, 1 << 20));
                    let collective = DiesAt { ring, all_reduces: count, at };
                    // As `worker run` does: a trainer first, then each generation's collective.
                    let mut trainer = Trainer::new(cfg, model, Box::new(LocalCollective)).unwrap();
                    assert!(trainer.overlap.is_none(), "nothing to overlap with in a world of one");
                    trainer.use_collective(Box::new(collective)).unwrap();
                    assert!(trainer.overlap.is_some(), "the step reduces during backward");
                    let lc = LoaderConfig::from_section(&cfg.data, 2, true, cfg.job.seed, 0)
                        .for_training(&trainer.model);
                    let ids = &train.ids[2 * rank..2 * rank + 2];
                    let batch = Loader::new(train.dataset.clone(), ids, lc).unwrap().next().unwrap().unwrap();
                    let result = trainer.step(&batch);
                    // What the worker does before regrouping: the hooks go with the collective.
                    trainer.abort_collective();
                    assert!(trainer.overlap.is_none());
                    result
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut results = results.into_iter();
    let err = results.next().unwrap().expect_err("rank 0's step must fail");
    // The connection closed: not a timeout, which would have meant waiting for a silent peer.
    match &err {
        WorkerError::Collective(CollectiveError::Peer { peer: 1, source, .. }) => assert!(
            !matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "{err}"
        ),
        _ => panic!("rank 0: {err}"),
    }
    assert_eq!(counts[0].load(Ordering::SeqCst), 2, "rank 0 failed in its first bucket's all-reduce");
    let err = results.next().unwrap().expect_err("the dead rank's step fails too");
    assert!(err.to_string().contains("this rank died"), "{err}");
}
