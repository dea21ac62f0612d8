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
                s.spawn(move || {
                    f(Ring::connect(rank, addrs, l, 1, &RingKey::from_token("test"), T, timeout).unwrap())
                })
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

mod membership {
    use std::io::Cursor;

    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::data::proptests::config;

    fn key() -> RingKey {
        RingKey::from_token("test")
    }

    /// Connects to `addr` as `rank` of `generation` with `key` and runs the connecting side's
    /// handshake on a thread; the thread returns the stream (or the handshake's error).
    fn connect_as(
        addr: SocketAddr,
        key: RingKey,
        generation: u64,
        rank: usize,
        next_rank: usize,
    ) -> std::thread::JoinHandle<Result<TcpStream, String>> {
        std::thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(T)).unwrap();
            stream.set_nodelay(true).unwrap();
            handshake::connect(&mut stream, &key, generation, rank, next_rank).map(|()| stream)
        })
    }

    #[test]
    fn members_with_the_same_key_prove_themselves_to_each_other() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = connect_as(listener.local_addr().unwrap(), key(), 7, 2, 3);
        let mut accepted = accept_from(&listener, &key(), 7, 2, 3, Instant::now() + T).unwrap();
        let mut peer = peer.join().unwrap().unwrap();
        peer.write_all(b"!").unwrap();
        let mut marker = [0u8; 1];
        accepted.read_exact(&mut marker).unwrap();
        assert_eq!(&marker, b"!");
    }

    #[test]
    fn another_jobs_key_is_refused_on_both_sides() {
        // A worker of another job (another token) connects: the accepting rank refuses it and
        // keeps waiting, and the connecting side is told the peer failed its proof.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stranger = connect_as(addr, RingKey::from_token("other job"), 1, 0, 1);
        let err =
            accept_from(&listener, &key(), 1, 0, 1, Instant::now() + Duration::from_millis(500)).unwrap_err();
        assert!(matches!(err, CollectiveError::SetupTimeout { peer: 0, .. }), "{err}");
        let err = stranger.join().unwrap().unwrap_err();
        assert!(err.contains("could not prove it belongs to this job"), "{err}");

        // The other way round: an acceptor with another key answers; the connecting rank refuses.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let rank0 = connect_as(listener.local_addr().unwrap(), key(), 1, 0, 1);
        let other = RingKey::from_token("other job");
        assert!(accept_from(&listener, &other, 1, 0, 1, Instant::now() + Duration::from_millis(500)).is_err());
        assert!(rank0.join().unwrap().unwrap_err().contains("could not prove"));
    }

    #[test]
    fn a_replayed_exchange_is_refused() {
        // Someone records a real member's bytes and replays them on a later connection: the
        // accepting rank's fresh nonce makes the recorded proof worthless.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (recorder, recorded) = mpsc::channel();
        let relay = std::thread::spawn(move || {
            // Plays the acceptor towards the member, to record what it sends.
            let (mut member, _) = listener.accept().unwrap();
            let mut hello = [0u8; handshake::HELLO_LEN];
            member.read_exact(&mut hello).unwrap();
            recorder.send(hello).unwrap();
            listener
        });
        let member = connect_as(addr, key(), 1, 0, 1);
        let hello = recorded.recv().unwrap();
        let listener = relay.join().unwrap();
        drop(member); // it waits for an answer that never comes; its thread ends on timeout
        let mut replay = TcpStream::connect(addr).unwrap();
        replay.write_all(&hello).unwrap();
        let mut answer = [0u8; 48];
        let replayed = std::thread::spawn(move || {
            replay.read_exact(&mut answer).unwrap();
            // The right proof would need the key: send anything.
            replay.write_all(&[0u8; 32]).unwrap();
        });
        assert!(accept_from(&listener, &key(), 1, 0, 1, Instant::now() + Duration::from_millis(500)).is_err());
        replayed.join().unwrap();
    }

    #[test]
    fn silent_strangers_do_not_delay_the_ring_set_up() {
        // Strangers connect to the ring port first, more than may be pending at once, and say
        // nothing, holding their connections open. The real peer, connecting after them, is
        // accepted within a set-up deadline shorter than one stranger's hello timeout: the
        // strangers wait on their own threads, and the oldest are closed to make room.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _strangers: Vec<TcpStream> =
            (0..MAX_PENDING_HANDSHAKES + 8).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let peer = connect_as(addr, key(), 1, 0, 1);
        accept_from(&listener, &key(), 1, 0, 1, Instant::now() + HELLO_TIMEOUT).unwrap();
        peer.join().unwrap().unwrap();
    }

    #[test]
    fn the_hello_names_magic_generation_and_rank() {
        let nonce = [9u8; 16];
        let err = |bytes: &[u8]| {
            let mut stream = Cursor::new(bytes.to_vec());
            handshake::accept(&mut stream, &key(), 7, 3, 4).unwrap_err()
        };
        assert!(err(&handshake::hello(6, 3, &nonce)).contains("generation 6, rank 3; expected 7, 3"));
        assert!(err(&handshake::hello(7, 2, &nonce)).contains("generation 7, rank 2"));
        assert!(err(b"GET / HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxx\r\n").contains("magic"));
        assert!(err(b"MTL2").contains("no 36-byte hello"));
        // The right hello but no proof after the answer.
        assert!(err(&handshake::hello(7, 3, &nonce)).contains("no proof"));
    }

    proptest! {
        #![proptest_config(config(128))]

        #[test]
        fn arbitrary_bytes_never_pass_the_handshake(
            bytes in prop_oneof![
                vec(any::<u8>(), 0..100),
                (any::<u64>(), 0u64..4, vec(any::<u8>(), 0..60)).prop_map(|(g, r, tail)| {
                    let mut b = b"MTL2".to_vec();
                    b.extend(g.to_le_bytes());
                    b.extend(r.to_le_bytes());
                    b.extend(tail);
                    b
                }),
            ],
            generation in 0u64..3,
            rank in 0usize..4,
        ) {
            let mut stream = Cursor::new(bytes);
            prop_assert!(handshake::accept(&mut stream, &key(), generation, rank, rank + 1).is_err());
        }

        #[test]
        fn a_stranger_on_the_ring_port_is_ignored_and_the_peer_accepted(
            bytes in vec(any::<u8>(), 0..100),
        ) {
            // Over loopback: a stranger writes arbitrary bytes and hangs up, then the real
            // peer connects; the accept loop must refuse the stranger and return the peer.
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            {
                let mut stranger = TcpStream::connect(addr).unwrap();
                stranger.write_all(&bytes).unwrap();
            }
            let peer = connect_as(addr, key(), 2, 1, 2);
            let mut accepted = accept_from(&listener, &key(), 2, 1, 2, Instant::now() + T).unwrap();
            let mut peer = peer.join().unwrap().unwrap();
            peer.write_all(b"!").unwrap();
            let mut marker = [0u8; 1];
            accepted.read_exact(&mut marker).unwrap();
            prop_assert_eq!(&marker, b"!");
        }
    }
}
