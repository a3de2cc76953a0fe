//! Inputs and how they mutate: an [`Input`] is one or more named parts (a GGUF file; a config.json
//! and a safetensors file; a template and its messages...), a deterministic [`Rng`], and the havoc
//! mutations (bit flips, byte insert/delete/duplicate, interesting integers over 1/2/4/8 bytes,
//! decimal numbers in text replaced by extreme ones, splices from other inputs, dictionary tokens).

/// A fuzz input: one byte string per part of the target (see `Target::parts`).
pub type Input = Vec<Vec<u8>>;

/// Serializes an input for the shared page and for findings: the part count, then each part's
/// length and bytes (u32 little-endian).
pub fn encode(input: &Input, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&(input.len() as u32).to_le_bytes());
    for p in input {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
}

/// The inverse of [`encode`]; `None` for bytes it did not write.
pub fn decode(mut b: &[u8]) -> Option<Input> {
    let mut take = |n: usize| -> Option<&[u8]> {
        let (h, t) = (b.get(..n)?, b.get(n..)?);
        b = t;
        Some(h)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    if count > 64 {
        return None;
    }
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        parts.push(take(len)?.to_vec());
    }
    Some(parts)
}

/// xoshiro256** seeded through SplitMix64: fast, and the same sequence for the same `--seed`.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability `1 / n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Integers that break size and offset arithmetic.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    15,
    16,
    31,
    32,
    63,
    64,
    127,
    128,
    255,
    256,
    1023,
    1024,
    4095,
    4096,
    32767,
    32768,
    65535,
    65536,
    (1 << 24) - 1,
    1 << 24,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX,
    u64::MAX - 1,
    (-2i64) as u64,
    (-128i64) as u64,
    (-129i64) as u64,
    (-32768i64) as u64,
    (-(1i64 << 31)) as u64,
];

/// Decimal (and JSON) numbers written over a number found in text.
const INTERESTING_TEXT: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "-2",
    "255",
    "256",
    "65536",
    "2147483647",
    "2147483648",
    "-2147483649",
    "4294967295",
    "4294967296",
    "1099511627776",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "1e18",
    "1e308",
    "1e309",
    "-1e309",
    "1e-40",
    "1e-320",
    "0.0000001",
    "3.4028236e38",
    "NaN",
    "999999999999999999999999999999",
    "0.5",
    "1.5",
];

/// How [`mutate`] treats one part.
pub struct PartInfo {
    /// Mutations land in the first `hot` bytes nine times out of ten (a file's header rather than
    /// its tensor data); `usize::MAX`: anywhere.
    pub hot: usize,
    /// Longest the part may grow to.
    pub max_len: usize,
}

/// Applies 1 to 8 stacked mutations to one part of `input` (the parts' `info` from the target,
/// `others` the corpus for splicing, `dict` the target's tokens).
pub fn mutate(rng: &mut Rng, input: &mut Input, info: &[PartInfo], others: &[Input], dict: &[Vec<u8>]) {
    if input.is_empty() {
        return;
    }
    let part = rng.below(input.len());
    let rounds = 1 << rng.below(4);
    for _ in 0..rounds {
        let donor = if others.is_empty() { None } else { others[rng.below(others.len())].get(part) };
        mutate_once(rng, &mut input[part], &info[part.min(info.len() - 1)], donor.map(|v| v.as_slice()), dict);
    }
    for (p, i) in input.iter_mut().zip(info) {
        p.truncate(i.max_len);
    }
}

/// A position in `data` (`len + extra` positions), usually inside the hot region.
fn pos(rng: &mut Rng, len: usize, hot: usize, extra: usize) -> usize {
    let n = len + extra;
    if n == 0 {
        return 0;
    }
    if hot < len && !rng.one_in(10) {
        rng.below(hot.max(1) + extra).min(n - 1)
    } else {
        rng.below(n)
    }
}

fn mutate_once(rng: &mut Rng, d: &mut Vec<u8>, info: &PartInfo, donor: Option<&[u8]>, dict: &[Vec<u8>]) {
    let hot = info.hot;
    match rng.below(13) {
        0 if !d.is_empty() => {
            let p = pos(rng, d.len(), hot, 0);
            d[p] ^= 1 << rng.below(8);
        }
        1 if !d.is_empty() => {
            let p = pos(rng, d.len(), hot, 0);
            d[p] = rng.next_u64() as u8;
        }
        2 => {
            let p = pos(rng, d.len(), hot, 1);
            let n = 1 + rng.below(16);
            const PUNCT: &[u8] = b"{}[]\",:0123456789 \n\\%";
            let bytes: Vec<u8> = (0..n).map(|_| if rng.one_in(2) { rng.next_u64() as u8 } else { PUNCT[rng.below(PUNCT.len())] }).collect();
            d.splice(p..p, bytes);
        }
        3 if !d.is_empty() => {
            let p = pos(rng, d.len(), hot, 0);
            let most = if rng.one_in(4) { 256 } else { 16 };
            let n = (1 + rng.below(most)).min(d.len() - p);
            d.drain(p..p + n);
        }
        4 if !d.is_empty() => {
            // Duplicate a chunk (repeated structure: array elements, JSON objects, template blocks).
            let p = pos(rng, d.len(), hot, 0);
            let n = (1 + rng.below(64)).min(d.len() - p);
            let chunk = d[p..p + n].to_vec();
            let times = 1 + if rng.one_in(8) { rng.below(64) } else { 0 };
            let at = pos(rng, d.len(), hot, 1);
            for _ in 0..times {
                d.splice(at..at, chunk.iter().copied());
            }
        }
        5 | 6 if !d.is_empty() => {
            // An interesting integer over 1, 2, 4 or 8 bytes, either endianness.
            let width = 1 << rng.below(4);
            let v = *rng.pick(INTERESTING);
            let bytes = if rng.one_in(4) { v.to_be_bytes()[8 - width..].to_vec() } else { v.to_le_bytes()[..width].to_vec() };
            let p = pos(rng, d.len(), hot, 0);
            for (i, b) in bytes.into_iter().enumerate() {
                if let Some(x) = d.get_mut(p + i) {
                    *x = b;
                }
            }
        }
        7 if d.len() >= 4 => {
            // Small arithmetic on a little-endian 32-bit value (a length or a count).
            let p = pos(rng, d.len() - 3, hot, 0);
            let v = u32::from_le_bytes(d[p..p + 4].try_into().expect("4 bytes"));
            let delta = 1 + rng.below(16) as u32;
            let v = if rng.one_in(2) { v.wrapping_add(delta) } else { v.wrapping_sub(delta) };
            d[p..p + 4].copy_from_slice(&v.to_le_bytes());
        }
        8 => {
            // A decimal number in the text replaced by an extreme one.
            let digits: Vec<usize> = d.iter().enumerate().filter(|(_, c)| c.is_ascii_digit()).map(|(i, _)| i).collect();
            if digits.is_empty() {
                return;
            }
            let mut s = *rng.pick(&digits);
            while s > 0 && (d[s - 1].is_ascii_digit() || matches!(d[s - 1], b'.' | b'-' | b'e' | b'E' | b'+')) {
                s -= 1;
            }
            let mut e = s;
            while e < d.len() && (d[e].is_ascii_digit() || matches!(d[e], b'.' | b'-' | b'e' | b'E' | b'+')) {
                e += 1;
            }
            let with = rng.pick(INTERESTING_TEXT).as_bytes().to_vec();
            d.splice(s..e, with);
        }
        9 | 10 if !dict.is_empty() => {
            let tok = rng.pick(dict).clone();
            let p = pos(rng, d.len(), hot, 1);
            if rng.one_in(2) || p + tok.len() > d.len() {
                d.splice(p..p, tok);
            } else {
                d.splice(p..p + tok.len(), tok);
            }
        }
        11 | 12 => {
            // Splice: a chunk of another input's same part, inserted or written over.
            let Some(src) = donor.filter(|s| !s.is_empty()) else { return };
            let a = rng.below(src.len());
            let n = (1 + rng.below(256)).min(src.len() - a);
            let chunk = &src[a..a + n];
            let p = pos(rng, d.len(), hot, 1);
            if rng.one_in(2) {
                d.splice(p..p, chunk.iter().copied());
            } else {
                let end = (p + n).min(d.len());
                d.splice(p..end, chunk.iter().copied());
            }
        }
        _ => {
            if !d.is_empty() && rng.one_in(2) {
                let n = rng.below(d.len());
                d.truncate(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        let input = vec![b"abc".to_vec(), Vec::new(), vec![0, 255]];
        let mut out = Vec::new();
        encode(&input, &mut out);
        assert_eq!(decode(&out), Some(input));
        assert_eq!(decode(&out[..out.len() - 1]), None);
    }

    #[test]
    fn same_seed_same_mutations() {
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut input = vec![br#"{"max_tokens": 16, "n": 1}"#.to_vec()];
            let info = [PartInfo { hot: usize::MAX, max_len: 1 << 16 }];
            for _ in 0..100 {
                mutate(&mut rng, &mut input, &info, &[], &[b"null".to_vec()]);
            }
            input
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
