//! Per-thread buffers for canonicalizing a body only to digest it: the canonical form is needed
//! for a moment, so the buffers are reused from one body to the next.

use super::{Canonicalizer, Member, Text};

/// [`canonicalize`](super::canonicalize), handing the canonical form to `write` in order, in
/// one or more pieces, when it is lossless; `false` (and nothing written) when the body is not
/// JSON or its canonical form is not lossless. For a digest, which needs the form only for a
/// moment: an outermost object is not copied into key order but handed out a member at a
/// time, and the buffers are kept per thread and reused, so a body is canonicalized without
/// allocating once they have grown to its size; a buffer that grew past [`KEPT_BYTES`] bytes (or
/// [`KEPT_MEMBERS`] members) is dropped afterwards rather than kept.
pub(crate) fn with_lossless_canonical(body: &[u8], write: impl FnMut(&[u8])) -> bool {
    let mut buffers = BUFFERS.take();
    buffers.out.clear();
    let mut c = Canonicalizer {
        input: body,
        pos: 0,
        out: buffers.out,
        members: buffers.members,
        scratch: buffers.scratch,
        lossless: true,
        defer_outermost: true,
        outermost_deferred: false,
    };
    c.out.reserve(body.len());
    c.skip_whitespace();
    let parsed = c.value(0).is_some() && {
        c.skip_whitespace();
        c.pos == body.len()
    };
    let lossless = parsed && c.lossless;
    if lossless {
        c.pieces(write);
    }
    c.members.clear();
    BUFFERS.set(Buffers {
        out: kept(c.out, KEPT_BYTES),
        members: kept(recycled(c.members), KEPT_MEMBERS),
        scratch: kept(c.scratch, KEPT_BYTES),
    });
    lossless
}

/// The most bytes that the output and the scratch buffer of [`with_lossless_canonical`] each
/// keep between bodies: 64 KiB.
const KEPT_BYTES: usize = 64 * 1024;

/// The most members its members buffer keeps between bodies: 4,096, of 48 bytes each (192 KiB;
/// only after a body with that many members in its open objects at once). So a thread keeps at
/// most 320 KiB.
const KEPT_MEMBERS: usize = 4096;

/// `buffer`, or an empty one in its place when its capacity is over `limit`.
fn kept<T>(buffer: Vec<T>, limit: usize) -> Vec<T> {
    if buffer.capacity() > limit {
        Vec::new()
    } else {
        buffer
    }
}

/// An empty members buffer, for any input's lifetime, in the same allocation: the standard
/// library collects a mapped `into_iter` in place when the element types have the same size and
/// alignment (were it ever not to, this would allocate anew, and nothing worse).
fn recycled<'a, 'b>(members: Vec<Member<'a>>) -> Vec<Member<'b>> {
    debug_assert!(members.is_empty());
    members
        .into_iter()
        .map(|member| Member {
            prefix: member.prefix,
            key: Text::Plain(&[]),
            text: member.text,
        })
        .collect()
}

/// [`with_lossless_canonical`]'s buffers, kept for the next body.
#[derive(Default)]
struct Buffers {
    out: Vec<u8>,
    members: Vec<Member<'static>>,
    scratch: Vec<u8>,
}

thread_local! {
    static BUFFERS: std::cell::Cell<Buffers> = const {
        std::cell::Cell::new(Buffers {
            out: Vec::new(),
            members: Vec::new(),
            scratch: Vec::new(),
        })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_kept_up_to_its_limit_and_dropped_past_it() {
        assert_eq!(
            kept(Vec::<u8>::with_capacity(KEPT_BYTES), KEPT_BYTES).capacity(),
            KEPT_BYTES
        );
        assert_eq!(
            kept(Vec::<u8>::with_capacity(KEPT_BYTES + 1), KEPT_BYTES).capacity(),
            0
        );
    }
}
