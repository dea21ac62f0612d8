//! SplitMix64 (Steele, Lea and Flood 2014; Vigna's `splitmix64.c`): the one seeded generator of
//! the project. Sharding permutations, synthetic data, augmentation, PCGrad's task order and the
//! tests' shuffles all draw from it.
//!
//! Written out rather than taken from a crate so that every stream (which samples a rank trains,
//! the bytes `gen-data` writes) is fixed by this file alone and never moves with a dependency
//! upgrade. The streams are pinned by tests.

/// A SplitMix64 stream: the state advances by [`SplitMix64::GAMMA`] and each output is the
/// state passed through [`SplitMix64::mix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// The state increment (the golden ratio in 64-bit fixed point).
    pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// A stream starting from `state` (the first output mixes `state + GAMMA`).
    pub fn new(state: u64) -> Self {
        Self { state }
    }

    /// SplitMix64's output function (a variant of MurmurHash3's finaliser), also used to
    /// derive a state from several key parts.
    pub fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        Self::mix(self.state)
    }

    /// An integer in `[0, n)` by multiply-shift (bias below `n / 2^64`); `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Fisher-Yates shuffle drawing `j = next_u64() % (i + 1)` for `i` from the end: the modulo
    /// form PCGrad's task order has always used, kept so that its stream does not change.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_implementation() {
        // Vigna's splitmix64.c with x = 0 prints e220a8397b1dcdaf, 6e789e6aa1b965f4, 06c45d188009454f.
        let mut r = SplitMix64::new(0);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]);
    }

    #[test]
    fn below_and_shuffle_are_pinned() {
        // Python (the streams as they were before the copies were merged):
        //   M, G = (1 << 64) - 1, 0x9E3779B97F4A7C15
        //   def mix(z):
        //       z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        //       z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        //       return z ^ (z >> 31)
        //   s = 5; out = []
        //   for _ in range(6): s = (s + G) & M; out.append((mix(s) * 7) >> 64)        # below(7)
        //   s = 3; v = list(range(10))
        //   for k in range(9, 0, -1): s = (s + G) & M; j = mix(s) % (k + 1); v[k], v[j] = v[j], v[k]
        let mut r = SplitMix64::new(5);
        let below: Vec<u64> = (0..6).map(|_| r.below(7)).collect();
        assert_eq!(below, [2, 5, 1, 0, 1, 2]);
        let mut v: Vec<u32> = (0..10).collect();
        SplitMix64::new(3).shuffle(&mut v);
        assert_eq!(v, [2, 8, 7, 4, 5, 6, 0, 1, 9, 3]);
    }
}
