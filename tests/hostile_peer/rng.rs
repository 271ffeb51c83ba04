//! A deterministic PRNG, and values that sit on the edges of whatever they are written into.

/// xorshift64*: small, fast, and the same sequence on every machine.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number below `n` (which is not 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub(crate) fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Values that sit on the edges of whatever they are written into.
pub(crate) const INTERESTING_U64: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    16,
    24,
    0x7f,
    0x80,
    0xff,
    1023,
    1024,
    1025,
    4096,
    65535,
    65536,
    (64 << 10) - 24,
    1 << 20,
    32 << 20,
    (32 << 20) + 1,
    1 << 30,
    (1 << 30) + 1,
    u32::MAX as u64 - 1,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];
