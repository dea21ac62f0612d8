//! The ring's membership proof. A connection to a ring port is only a peer once both ends have
//! shown that they hold the job's key, over this generation, these two ranks and two fresh
//! nonces: the connecting rank sends a hello with its nonce, the accepting rank answers with its
//! nonce and a MAC over both, and the connecting rank answers with its own MAC. Labels keep one
//! side's MAC from being replayed as the other's, and the nonces keep an old exchange from being
//! replayed at all. The key is derived from the job token (docs/SECURITY.md): a stranger on the
//! network, or another job's worker, can neither join the ring nor pass as one of its ranks.
use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"MTL2";
const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;
/// Magic, generation, the connecting rank, its nonce.
pub(super) const HELLO_LEN: usize = 4 + 8 + 8 + NONCE_LEN;

/// The key ranks prove their membership with.
#[derive(Clone)]
pub(crate) struct RingKey([u8; 32]);

impl RingKey {
    /// The ring key of the job whose token is `token` (a keyed hash, so the token itself never
    /// crosses a ring connection).
    pub(crate) fn from_token(token: &str) -> Self {
        let mut mac = HmacSha256::new_from_slice(token.as_bytes()).expect("HMAC takes any key length");
        mac.update(b"mtl ring key v1");
        Self(mac.finalize().into_bytes().into())
    }

    fn mac(&self, label: &[u8], generation: u64, from: usize, to: usize, nonces: [&[u8]; 2]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(&generation.to_le_bytes());
        mac.update(&(from as u64).to_le_bytes());
        mac.update(&(to as u64).to_le_bytes());
        for nonce in nonces {
            mac.update(nonce);
        }
        mac
    }
}

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingKey(..)")
    }
}

fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

pub(super) fn hello(generation: u64, rank: usize, nonce: &[u8; NONCE_LEN]) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4..12].copy_from_slice(&generation.to_le_bytes());
    out[12..20].copy_from_slice(&(rank as u64).to_le_bytes());
    out[20..].copy_from_slice(nonce);
    out
}

/// The connecting side: rank `rank` proves itself to `next_rank` and checks that the other end
/// is `next_rank` of this job and generation. The error says what went wrong.
pub(super) fn connect(
    stream: &mut (impl Read + Write),
    key: &RingKey,
    generation: u64,
    rank: usize,
    next_rank: usize,
) -> Result<(), String> {
    let ours = nonce();
    stream.write_all(&hello(generation, rank, &ours)).map_err(|e| format!("sending the hello: {e}"))?;
    let mut answer = [0u8; NONCE_LEN + MAC_LEN];
    stream.read_exact(&mut answer).map_err(|e| format!("no answer to the hello: {e}"))?;
    let (theirs, proof) = answer.split_at(NONCE_LEN);
    key.mac(b"accept", generation, rank, next_rank, [&ours, theirs]).verify_slice(proof).map_err(|_| {
        "the peer could not prove it belongs to this job (a different job token?)".to_string()
    })?;
    let reply = key.mac(b"connect", generation, rank, next_rank, [theirs, &ours]).finalize().into_bytes();
    stream.write_all(&reply).map_err(|e| format!("sending the proof: {e}"))
}

/// The accepting side: checks that the connection is `prev_rank` of this job and generation
/// and proves itself back. The error says what was read instead.
pub(super) fn accept(
    stream: &mut (impl Read + Write),
    key: &RingKey,
    generation: u64,
    prev_rank: usize,
    rank: usize,
) -> Result<(), String> {
    let mut hello = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello).map_err(|e| format!("no {HELLO_LEN}-byte hello: {e}"))?;
    if &hello[..4] != MAGIC {
        return Err(format!("magic {:?}, expected {:?}", &hello[..4], MAGIC));
    }
    let field = |range: std::ops::Range<usize>| u64::from_le_bytes(hello[range].try_into().expect("8 bytes"));
    let (theirs_generation, theirs_rank) = (field(4..12), field(12..20));
    if theirs_generation != generation || theirs_rank != prev_rank as u64 {
        return Err(format!(
            "generation {theirs_generation}, rank {theirs_rank}; expected {generation}, {prev_rank}"
        ));
    }
    let theirs = &hello[20..];
    let ours = nonce();
    let mut answer = [0u8; NONCE_LEN + MAC_LEN];
    answer[..NONCE_LEN].copy_from_slice(&ours);
    answer[NONCE_LEN..].copy_from_slice(
        &key.mac(b"accept", generation, prev_rank, rank, [theirs, &ours]).finalize().into_bytes(),
    );
    stream.write_all(&answer).map_err(|e| format!("sending the answer: {e}"))?;
    let mut proof = [0u8; MAC_LEN];
    stream.read_exact(&mut proof).map_err(|e| format!("no proof after the answer: {e}"))?;
    key.mac(b"connect", generation, prev_rank, rank, [&ours, theirs])
        .verify_slice(&proof)
        .map_err(|_| "a wrong proof (not a member of this job: a different job token?)".to_string())
}
