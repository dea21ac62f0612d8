//! Ring all-reduce across real processes: a peer killed mid-collective makes the others fail
//! with an error naming a peer, within the timeout, instead of hanging.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_addrs(n: usize) -> Vec<String> {
    let ls: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect()
}

#[test]
fn killing_a_rank_mid_all_reduce_fails_the_others_without_hanging() {
    let peers = free_addrs(3).join(",");
    let spawn = |rank: usize| {
        Command::new(common::bin("worker"))
            .args(["collective-bench", "--rank", &rank.to_string(), "--peers", &peers])
            // A quick 1 MiB round, then many 64 MiB rounds: seconds of all-reduce traffic for
            // the kill to land in.
            .args([
                "--sizes-mib",
                &format!("1{}", ",64".repeat(20)),
                "--iterations",
                "10",
                "--timeout-ms",
                "5000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut ranks: Vec<_> = (0..3).map(spawn).collect();
    // Rank 0 prints the 1 MiB result once the ring is up and running: then kill rank 2.
    let mut stdout = BufReader::new(ranks[0].stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("\"size_bytes\":1048576"), "rank 0 reported the first size: {line}");
    ranks[2].kill().unwrap();
    ranks[2].wait().unwrap();
    let killed_at = Instant::now();
    for (rank, child) in ranks.into_iter().enumerate().take(2) {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "rank {rank} must fail: {stderr}");
        assert!(stderr.contains("peer rank"), "rank {rank} names a peer: {stderr}");
    }
    assert!(killed_at.elapsed() < Duration::from_secs(30), "survivors exited within the timeout");
}
