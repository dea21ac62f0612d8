use super::*;
use std::sync::mpsc;

const T: Duration = Duration::from_secs(20);

/// Binds `n` loopback listeners and returns them with their addresses.
fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

/// Runs `f(ring)` on `n` ranks, each on its own thread, and returns their results by rank.
fn on_ring<R: Send>(n: usize, timeout: Duration, f: impl Fn(Ring) -> R + Sync) -> Vec<R> {
    let (ls, addrs) = listeners(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let addrs = &addrs;
                let f = &f;
                s.spawn(move || f(Ring::connect(rank, addrs, l, 1, T, timeout).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Integer-valued inputs so sums are exact in f32 regardless of order.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i % 1000) as f32) * (rank as f32 + 1.0)).collect()
}

fn expected_sum(n: usize, len: usize) -> Vec<f32> {
    let factor: f32 = (1..=n).map(|r| r as f32).sum();
    (0..len).map(|i| ((i % 1000) as f32) * factor).collect()
}

#[test]
fn all_reduce_sums_for_awkward_sizes_and_world_sizes() {
    for n in [1usize, 2, 3, 4] {
        for len in [0, 1, n.saturating_sub(1), n, 7 * n + 1, 1000, (SEGMENT_BYTES / 4) * 2 + 3] {
            let results = on_ring(n, T, |mut ring| {
                let mut data = input(ring.rank(), len);
                ring.all_reduce(&mut data, ReduceOp::Sum).unwrap();
                data
            });
            let want = expected_sum(n, len);
            for (rank, got) in results.iter().enumerate() {
                assert_eq!(got, &want, "n={n} len={len} rank={rank}");
            }
        }
    }
}

#[test]
fn mean_divides_by_world_size_and_f64_works() {
    let results = on_ring(3, T, |mut ring| {
        let mut data = vec![ring.rank() as f64 * 3.0, 1.5];
        ring.all_reduce(&mut data, ReduceOp::Mean).unwrap();
        data
    });
    for got in results {
        assert_eq!(got, vec![3.0, 1.5]);
    }
}

#[test]
fn all_reduce_of_100m_elements() {
    let len = 100_000_000;
    let results = on_ring(2, Duration::from_secs(120), |mut ring| {
        let mut data = input(ring.rank(), len);
        ring.all_reduce(&mut data, ReduceOp::Sum).unwrap();
        // Compare here, so the test keeps two 400 MB buffers alive, not four.
        let want = expected_sum(2, len);
        data == want
    });
    assert_eq!(results, [true, true]);
}

#[test]
fn broadcast_and_barrier() {
    for root in 0..3 {
        let results = on_ring(3, T, |mut ring| {
            let mut data = input(ring.rank() + 10, 1001);
            ring.broadcast(&mut data, root).unwrap();
            ring.barrier().unwrap();
            data
        });
        for got in results {
            assert_eq!(got, input(root + 10, 1001), "root {root}");
        }
    }
}

#[test]
fn a_peer_that_dies_fails_the_others_naming_a_peer() {
    let results = on_ring(3, T, |mut ring| {
        if ring.rank() == 2 {
            drop(ring); // closes both sockets, as a killed process would
            return None;
        }
        let mut data = input(ring.rank(), 1 << 20);
        Some(ring.all_reduce(&mut data, ReduceOp::Sum))
    });
    for (rank, result) in results.into_iter().enumerate().take(2) {
        let err = result.unwrap().expect_err("all-reduce with a dead peer must fail");
        assert!(matches!(err, CollectiveError::Peer { .. }), "rank {rank}: {err}");
        assert!(err.to_string().contains("peer rank"), "{err}");
    }
}

#[test]
fn a_silent_peer_times_out_instead_of_hanging() {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = std::sync::Mutex::new(done_rx);
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let results = on_ring(3, timeout, |mut ring| {
        if ring.rank() == 1 {
            // Stays connected but never takes part, until the others have given up.
            let rx = done_rx.lock().unwrap();
            let _ = rx.recv();
            let _ = rx.recv();
            return None;
        }
        let mut data = input(ring.rank(), 1000);
        let result = ring.all_reduce(&mut data, ReduceOp::Sum);
        done_tx.send(()).unwrap();
        Some(result)
    });
    assert!(started.elapsed() < Duration::from_secs(15), "gave up within the timeout, not hung");
    for result in results.into_iter().flatten() {
        assert!(matches!(result, Err(CollectiveError::Peer { .. })), "{result:?}");
    }
}

#[test]
fn chunk_bounds_cover_the_buffer_exactly() {
    for len in 0..40 {
        for n in 1..6 {
            let mut next = 0;
            for c in 0..n {
                let (s, e) = chunk_bounds(len, n, c);
                assert_eq!(s, next);
                assert!(e - s <= len / n + 1);
                next = e;
            }
            assert_eq!(next, len);
        }
    }
}
