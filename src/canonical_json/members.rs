//! An object's members and their key order: [`Member`], [`sort_members`], and the string
//! [`Text`] a key or value holds.

use std::ops::Range;

/// A member of an object being written.
pub(super) struct Member<'a> {
    /// The first eight bytes of the key (zeros past its end), big-endian: keys whose prefixes
    /// differ are in the order of their prefixes, so most comparisons need nothing else.
    pub(super) prefix: u64,
    pub(super) key: Text<'a>,
    /// Where its `"key":value` text lies in `out`.
    pub(super) text: Range<usize>,
}

/// Sorts an object's members by key, stably (members with one key stay in arrival order), and
/// says whether the object must be written again: a member moved, or a key came twice. By
/// insertion for up to [`INSERTION_SORT_MAX`] members (most objects), where members that came in
/// order cost a comparison each.
pub(super) fn sort_members(object: &mut [Member<'_>]) -> bool {
    if object.len() > INSERTION_SORT_MAX {
        let in_order = object
            .windows(2)
            .all(|pair| pair[0].key_cmp(&pair[1]).is_lt());
        if !in_order {
            object.sort_by(Member::key_cmp);
        }
        return !in_order;
    }
    let mut rewrite = false;
    for i in 1..object.len() {
        let mut j = i;
        loop {
            match object[j - 1].key_cmp(&object[j]) {
                std::cmp::Ordering::Less => break,
                std::cmp::Ordering::Equal => {
                    rewrite = true;
                    break;
                }
                std::cmp::Ordering::Greater => {
                    object.swap(j - 1, j);
                    rewrite = true;
                    j -= 1;
                    if j == 0 {
                        break;
                    }
                }
            }
        }
    }
    rewrite
}

/// The most members [`sort_members`] sorts by insertion.
const INSERTION_SORT_MAX: usize = 16;

impl Member<'_> {
    /// The order of the keys' UTF-8 bytes.
    #[inline(always)]
    pub(super) fn key_cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.prefix
            .cmp(&other.prefix)
            .then_with(|| self.key.as_bytes().cmp(other.key.as_bytes()))
    }
}

/// The first `min(len, 8)` bytes of `bytes[start..start + len]` as a big-endian `u64`, padded
/// with zero bytes. If one key's prefix is below another's, the key is below it too: at the
/// first byte where the prefixes differ, either both keys have a byte and they differ the same
/// way, or the lower key has ended there and is a prefix of the other.
pub(super) fn prefix_of(bytes: &[u8], start: usize, len: usize) -> u64 {
    let word = match bytes.get(start..start + 8) {
        Some(eight) => u64::from_be_bytes(eight.try_into().expect("eight bytes")),
        None => {
            let mut eight = [0u8; 8];
            let tail = &bytes[start..];
            eight[..tail.len()].copy_from_slice(tail);
            u64::from_be_bytes(eight)
        }
    };
    match len {
        0 => 0,
        1..8 => word & !(u64::MAX >> (8 * len)),
        _ => word,
    }
}

/// The content of a string token.
pub(super) enum Text<'a> {
    /// Straight from the text: the token had no escape sequence, so it holds no `"`, no `\\`
    /// and no control character, and needs no escaping.
    Plain(&'a [u8]),
    /// Decoded by serde_json.
    Decoded(String),
}

impl Text<'_> {
    pub(super) fn as_bytes(&self) -> &[u8] {
        match self {
            Text::Plain(text) => text,
            Text::Decoded(text) => text.as_bytes(),
        }
    }
}
