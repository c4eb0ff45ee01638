//! Reading and writing tokens: the run of a string that needs no escaping ([`plain_run`]), a
//! short copy without a `memcpy` call ([`append`]), and scalars written by `serde_json`.

use std::ops::Range;

/// From `i`, the end of the run of string bytes that need no escaping (the index of the first
/// `"`, `\\` or control character, or the end of the input), and whether the run is all ASCII.
/// Eight bytes at a time, with the usual bit tricks: in each flag word the lowest flagged byte
/// is a real match (a false flag needs a borrow from a real match below it), so the first stop
/// in a chunk is found without going back over it byte by byte.
///
/// `#[inline]`: the string reader in the parent module inlines it where it pays, as it did when
/// both lived in one file (without it, 1.4% more instructions at 64 KiB).
#[inline]
pub(super) fn plain_run(input: &[u8], mut i: usize) -> (usize, bool) {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Flags the bytes of `x` that are zero.
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut seen = 0u64;
    while let Some(chunk) = input.get(i..i + 8) {
        // Little-endian: the lowest byte of `x` is the first in the input.
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let stops = (x.wrapping_sub(ONES * 0x20) & !x & HIGH)
            | zero_byte(x ^ (ONES * u64::from(b'"')))
            | zero_byte(x ^ (ONES * u64::from(b'\\')));
        if stops != 0 {
            let run = (stops.trailing_zeros() / 8) as usize;
            seen |= x & ((1u64 << (8 * run)) - 1);
            return (i + run, seen & HIGH == 0);
        }
        seen |= x;
        i += 8;
    }
    let mut seen_byte = 0u8;
    while let Some(&b) = input.get(i) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        seen_byte |= b;
        i += 1;
    }
    (i, seen & HIGH == 0 && seen_byte < 0x80)
}

/// Appends `src[range]` to `dst`. A short range is copied as a fixed 32 bytes (two moves, no
/// call to `memcpy`) and the excess cut off again: most JSON tokens are that short.
#[inline(always)]
pub(super) fn append(dst: &mut Vec<u8>, src: &[u8], range: Range<usize>) {
    const SHORT: usize = 32;
    let len = range.len();
    if len <= SHORT
        && let Some(chunk) = src.get(range.start..range.start + SHORT)
    {
        dst.extend_from_slice(chunk);
        dst.truncate(dst.len() - (SHORT - len));
        return;
    }
    dst.extend_from_slice(&src[range]);
}

pub(super) fn write_scalar<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // Writing a string, number, bool or null into a Vec cannot fail.
    serde_json::to_writer(out, value).expect("serializing a JSON scalar into memory");
}
