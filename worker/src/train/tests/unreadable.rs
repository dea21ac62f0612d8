//! `data.max_unreadable_fraction` through the real epoch loop: a run on unreadable images
//! fails with an error naming the epoch and paths; a few skipped images still train; ranks
//! whose images differ decide together.
use super::*;

/// Overwrites the images of `ids` with bytes no decoder reads.
fn corrupt(train: &OrderedSplit, ids: &[u64]) {
    for s in train.dataset.samples.iter().filter(|s| ids.contains(&s.id)) {
        std::fs::write(&s.image, b"corrupt").unwrap();
    }
}

fn shard(cfg: &JobConfig, train: &OrderedSplit, world: u32, rank: u32) -> sharding::TrainShard {
    sharding::train_shard(sharding::ShardSpec {
        samples: train.ids.len() as u64,
        seed: cfg.job.seed,
        epoch: 0,
        consumed: 0,
        world_size: world,
        rank,
        batch_size: cfg.train.batch_size,
    })
}

/// Trains on one rank; the outcome and the steps taken.
fn train_alone(cfg: &JobConfig, train: &OrderedSplit) -> (Result<epochs::Outcome, WorkerError>, u64) {
    let model = job::job_model(cfg, &train.dataset.info, Device::Cpu).unwrap();
    let mut trainer = Trainer::new(cfg, model, Box::new(LocalCollective)).unwrap();
    let mut recorder = Recorder::new(cfg, 1, 0);
    let outcome = epochs::train(cfg, &mut trainer, train, Position::default(), None, &mut recorder);
    (outcome, trainer.steps_done())
}

#[test]
fn a_run_whose_images_cannot_be_read_fails_at_its_first_step_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "");
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap());
    corrupt(&train, &train.ids);
    let (outcome, steps) = train_alone(&cfg, &train);
    let err = outcome.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, WorkerError::Data { ref key, .. } if key == "data.max_unreadable_fraction"),
        "{message}"
    );
    let b = cfg.train.batch_size;
    let want =
        format!("epoch 0: {b} of its {} training images (all ranks) cannot be read", STEPS * u64::from(b));
    assert!(message.contains(&want), "{message}");
    assert!(
        message.contains("> the limit 1.00%") && message.contains(".png (cannot read image"),
        "{message}"
    );
    assert_eq!(steps, 1, "the first step decides");
}

#[test]
fn unreadable_images_within_the_limit_are_skipped_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = job(dir.path(), "");
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap());
    let first = train.ids_at(&shard(&cfg, &train, 1, 0).positions[..1]);
    corrupt(&train, &first);
    // One image of the run's 3 x 8 is 4.2%: over the default limit, within 5%.
    let (outcome, _) = train_alone(&cfg, &train);
    assert!(outcome.unwrap_err().to_string().contains("1 of its 24 training images"));
    cfg.data.max_unreadable_fraction = 0.05;
    let (outcome, steps) = train_alone(&cfg, &train);
    assert_eq!(outcome.unwrap().skipped_images, 1);
    assert_eq!(steps, STEPS);
}

#[test]
fn ranks_count_together_and_fail_together_when_one_ranks_images_are_unreadable() {
    // Rank 1's first batch is unreadable, rank 0's images are fine: the skipped images ride in
    // the step's all-reduce, so both ranks fail at the same step with the same count, and
    // neither is left waiting in a collective.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = job(dir.path(), "");
    cfg.train.batch_size = 2;
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap());
    let rank1 = shard(&cfg, &train, 2, 1);
    corrupt(&train, &train.ids_at(&rank1.positions[..2]));
    let info = train.dataset.info.clone();
    let listeners: Vec<TcpListener> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let results: Vec<(String, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (cfg, train, addrs, info) = (&cfg, &train, &addrs, &info);
                s.spawn(move || {
                    let t = Duration::from_secs(60);
                    let ring = Ring::for_tests(rank, addrs, listener, t);
                    let model = job::job_model(cfg, info, Device::Cpu).unwrap();
                    let mut trainer =
                        Trainer::new(cfg, model, Box::new(RingCollective::new(ring, 1 << 20))).unwrap();
                    let mut recorder = Recorder::new(cfg, 2, rank as u32);
                    let err =
                        epochs::train(cfg, &mut trainer, train, Position::default(), None, &mut recorder)
                            .unwrap_err();
                    assert!(matches!(err, WorkerError::Data { .. }), "rank {rank}: {err}");
                    (err.to_string(), trainer.steps_done())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let want = format!("epoch 0: 2 of its {} training images (all ranks) cannot be read", STEPS * 4);
    for (rank, (message, steps)) in results.iter().enumerate() {
        assert!(message.contains(&want), "rank {rank}: {message}");
        assert_eq!(*steps, 1, "rank {rank} stopped at the first step");
    }
    assert!(results[0].0.contains("none on this rank"), "{}", results[0].0);
    assert!(results[1].0.contains(".png (cannot read image"), "{}", results[1].0);
}
