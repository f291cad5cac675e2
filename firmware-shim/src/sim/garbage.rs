//! Simulated line noise: corrupts a share of the frames (or lines) written.
//!
//! Each item written has probability `rate` of one corruption event; half the
//! events insert a burst of [`MIN_BURST`]..=[`MAX_BURST`] random bytes before
//! the item (the item itself stays intact), half flip one random bit inside
//! the item. For frames the flip stays between the two 0x00 delimiters, for
//! lines before the newline, so exactly one item is damaged and its
//! neighbours still decode.

use core::ops::Range;

use super::rng::Rng;

/// Fewest random bytes in a burst.
pub const MIN_BURST: usize = 1;
/// Most random bytes in a burst; shorter than a frame's maximum length, so
/// a burst is a framing or CRC error for the reader, never an oversize one.
pub const MAX_BURST: usize = 40;

/// One corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GarbageEvent {
    /// This many random bytes were written before the item.
    Burst(usize),
    /// Bit `bit` of byte `byte` (offset in the item) was flipped.
    BitFlip {
        /// Offset of the byte in the item.
        byte: usize,
        /// Bit number, 0 = least significant.
        bit: u8,
    },
}

/// Counts of events, for the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GarbageStats {
    /// Bursts of random bytes inserted.
    pub bursts: u64,
    /// Items with a flipped bit.
    pub bit_flips: u64,
}

impl GarbageStats {
    /// All events.
    pub fn events(&self) -> u64 {
        self.bursts + self.bit_flips
    }
}

/// The noise source.
#[derive(Debug, Clone)]
pub struct Garbage {
    rate: f64,
    rng: Rng,
    stats: GarbageStats,
}

impl Garbage {
    /// Corrupts each item with probability `rate` (clamped to 0..=1), using a
    /// PRNG seeded with `seed`.
    pub fn new(rate: f64, seed: u64) -> Self {
        Garbage {
            rate: rate.clamp(0.0, 1.0),
            rng: Rng::new(seed),
            stats: GarbageStats::default(),
        }
    }

    /// Events so far.
    pub fn stats(&self) -> GarbageStats {
        self.stats
    }

    /// Appends `item` to `out`, perhaps corrupted. `flippable` is the range
    /// of `item` a bit flip may touch; when empty, a flip becomes a burst.
    pub fn write(
        &mut self,
        item: &[u8],
        flippable: Range<usize>,
        out: &mut Vec<u8>,
    ) -> Option<GarbageEvent> {
        // Rate 0 draws nothing, so it leaves the stream byte-for-byte clean.
        if self.rate <= 0.0 || !self.rng.chance(self.rate) {
            out.extend_from_slice(item);
            return None;
        }
        let flip = self.rng.chance(0.5) && !flippable.is_empty() && flippable.end <= item.len();
        if flip {
            let span = (flippable.end - flippable.start) as u64;
            let byte = flippable.start + self.rng.below(span) as usize;
            let bit = self.rng.below(8) as u8;
            let at = out.len() + byte;
            out.extend_from_slice(item);
            out[at] ^= 1 << bit;
            self.stats.bit_flips += 1;
            Some(GarbageEvent::BitFlip { byte, bit })
        } else {
            let n = MIN_BURST + self.rng.below((MAX_BURST - MIN_BURST + 1) as u64) as usize;
            out.extend((0..n).map(|_| self.rng.byte()));
            out.extend_from_slice(item);
            self.stats.bursts += 1;
            Some(GarbageEvent::Burst(n))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn rate_zero_never_corrupts() {
        let mut g = Garbage::new(0.0, 1);
        let mut out = Vec::new();
        for i in 0..1000u32 {
            let item = i.to_le_bytes();
            assert_eq!(g.write(&item, 0..4, &mut out), None);
        }
        let expected: Vec<u8> = (0..1000u32).flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(out, expected);
        assert_eq!(g.stats().events(), 0);
    }

    #[test]
    fn rate_one_corrupts_every_item_half_and_half() {
        let mut g = Garbage::new(1.0, 1);
        for _ in 0..1000 {
            let item = [0u8, 1, 2, 3, 4, 0];
            let mut out = Vec::new();
            match g.write(&item, 1..5, &mut out).unwrap() {
                GarbageEvent::Burst(n) => {
                    assert!((MIN_BURST..=MAX_BURST).contains(&n));
                    assert_eq!(out.len(), n + item.len());
                    assert_eq!(&out[n..], &item);
                }
                GarbageEvent::BitFlip { byte, bit } => {
                    assert!((1..5).contains(&byte) && bit < 8);
                    assert_eq!(out.len(), item.len());
                    let diff: u32 = out
                        .iter()
                        .zip(&item)
                        .map(|(a, b)| (a ^ b).count_ones())
                        .sum();
                    assert_eq!(diff, 1);
                    assert_eq!(out[byte] ^ item[byte], 1 << bit);
                }
            }
        }
        let s = g.stats();
        assert_eq!(s.events(), 1000);
        assert!((400..600).contains(&s.bursts), "{s:?}");
    }
}
