//! A deterministic mutator for the parsers' fuzz tests (on stable Rust, in the
//! ordinary test suite): valid files are damaged the ways real files and
//! adversaries damage them — flipped bits, truncations, size fields set to
//! extreme values, numbers in text headers made huge — and each parser must
//! answer every one with a result or an error, never a panic, abort or hang.

/// A seeded xorshift generator with byte-level mutations.
pub struct Mutator {
    state: u64,
}

/// Values a corrupt size field likes to hold.
const EXTREMES: [u64; 8] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// One to three mutations of `input`.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..1 + self.below(3) {
            self.mutate_once(&mut out);
        }
        out
    }

    fn mutate_once(&mut self, out: &mut Vec<u8>) {
        if out.is_empty() {
            out.push(self.next_u64() as u8);
            return;
        }
        let at = self.below(out.len());
        match self.below(7) {
            0 => {
                for _ in 0..1 + self.below(8) {
                    let i = self.below(out.len());
                    out[i] ^= 1 << self.below(8);
                }
            }
            1 => out.truncate(at),
            2 | 3 => {
                // A 2-, 4- or 8-byte field set to an extreme, in either byte order.
                let width = [2usize, 4, 8][self.below(3)];
                let v = EXTREMES[self.below(EXTREMES.len())];
                let bytes = if self.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let start = at.min(out.len().saturating_sub(width));
                let end = (start + width).min(out.len());
                let src = if bytes[0] == 0 && width < 8 {
                    &bytes[8 - width..]
                } else {
                    &bytes[..width]
                };
                out[start..end].copy_from_slice(&src[..end - start]);
            }
            4 => {
                // A run of ASCII digits (text headers) made huge or negative.
                if let Some(d) = out.iter().skip(at).position(u8::is_ascii_digit).map(|p| p + at) {
                    let end = out[d..]
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .map_or(out.len(), |e| d + e);
                    let with: &[u8] = match self.below(3) {
                        0 => b"99999999999999999999",
                        1 => b"4294967297",
                        _ => b"-1",
                    };
                    out.splice(d..end, with.iter().copied());
                }
            }
            5 => {
                let n = 1 + self.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| self.next_u64() as u8).collect();
                out.splice(at..at, bytes);
            }
            _ => {
                let len = self.below(64).min(out.len() - at);
                let chunk = out[at..at + len].to_vec();
                let to = self.below(out.len());
                out.splice(to..to, chunk);
            }
        }
    }
}

/// Runs `case` for seeds `0..cases`, catching panics; returns the seeds that
/// panicked with their messages (empty when the parser held).
pub fn run_cases(cases: u64, mut case: impl FnMut(u64)) -> Vec<(u64, String)> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut panics = Vec::new();
    for seed in 0..cases {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(seed)));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panics.push((seed, msg));
        }
    }
    std::panic::set_hook(previous);
    panics
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_varied() {
        let input: Vec<u8> = (0..200).map(|i| i as u8).collect();
        let a: Vec<Vec<u8>> = (0..50).map(|s| Mutator::new(s).mutate(&input)).collect();
        let b: Vec<Vec<u8>> = (0..50).map(|s| Mutator::new(s).mutate(&input)).collect();
        assert_eq!(a, b);
        let distinct: std::collections::HashSet<&Vec<u8>> = a.iter().collect();
        assert!(distinct.len() > 45);
        assert!(a.iter().any(|m| m.len() < input.len()) && a.iter().any(|m| m.len() > input.len()));
        let caught = run_cases(3, |s| assert!(s != 1, "boom"));
        assert_eq!(caught.len(), 1);
        assert_eq!(caught[0].0, 1);
    }
}
