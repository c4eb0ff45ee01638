//! The canonical form of JSON bodies, which the [fingerprint](crate::fingerprint) hashes in
//! place of the bytes as sent: object keys sorted by their UTF-8 bytes, insignificant
//! whitespace dropped, strings re-escaped in one canonical way, numbers written as parsed,
//! array order kept. One pass over the text, without building a tree; the tests hold it to
//! the same bytes as parsing into a `serde_json::Value` and writing that with sorted keys.

/// The canonical form of a JSON text, or `None` if it is not JSON (or nests 128 levels deep or
/// more).
///
/// Object keys sorted by their UTF-8 bytes (for duplicate keys, the last one wins, as
/// `serde_json` parses), no whitespace, strings escaped as `serde_json` writes them, numbers as
/// parsed, arrays in order.
///
/// One pass over the text, accepting exactly what `serde_json` accepts: the structure is read
/// here, and every token whose canonical form is not its own text (a string with an escape
/// sequence, a number with a fraction or an exponent, or with more than 18 digits, or `-0`) is
/// parsed and written by `serde_json`. Each object is written as its members arrive and put in
/// key order only when they did not arrive in it.
pub fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    canonicalize(body).map(|(canonical, _)| canonical)
}

/// [`canonical_json`], and whether the canonical form is lossless: no object repeats a key and
/// every number's canonical text has the value of its text as sent.
pub(crate) fn canonicalize(body: &[u8]) -> Option<(Vec<u8>, bool)> {
    let mut c = Canonicalizer {
        input: body,
        pos: 0,
        out: Vec::with_capacity(body.len()),
        members: Vec::new(),
        scratch: Vec::new(),
        lossless: true,
        defer_outermost: false,
        outermost_deferred: false,
    };
    c.skip_whitespace();
    c.value(0)?;
    c.skip_whitespace();
    (c.pos == body.len()).then_some((c.out, c.lossless))
}

/// `serde_json`'s recursion limit: an array or object at this depth is an error.
const MAX_DEPTH: usize = 128;

struct Canonicalizer<'a> {
    input: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    /// The members of the objects being written, innermost last.
    members: Vec<Member<'a>>,
    /// Room to reorder one object's members.
    scratch: Vec<u8>,
    /// No repeated key dropped, no number rounded, so far.
    lossless: bool,
    /// Whether an outermost object whose members did not arrive in key order is left as it
    /// came, for [`Canonicalizer::pieces`] to hand out in order, rather than copied in order.
    defer_outermost: bool,
    /// It was: `out` holds the outermost object's `{` and its members as they came, without the
    /// closing `}`, and `members` holds them in key order.
    outermost_deferred: bool,
}

impl<'a> Canonicalizer<'a> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string_value(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A value inside an array or an object: a string or a number here, without a call (most
    /// are one of these), anything else by [`Canonicalizer::value`].
    #[inline(always)]
    fn element(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string_value(),
            b'-' | b'0'..=b'9' => self.number(),
            _ => self.value(depth),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        (self.input.get(self.pos..end)? == word).then_some(())?;
        self.pos = end;
        self.out.extend_from_slice(word);
        Some(())
    }

    /// A string value: read, then written in canonical form.
    #[inline(always)]
    fn string_value(&mut self) -> Option<()> {
        let start = self.pos;
        let text = self.string()?;
        self.write_string(&text, start);
        Some(())
    }

    /// Writes the string token `text` that began at `start`: a plain one is its token as it
    /// came, quotes included.
    #[inline(always)]
    fn write_string(&mut self, text: &Text<'_>, start: usize) {
        match text {
            Text::Plain(_) => append(&mut self.out, self.input, start..self.pos),
            Text::Decoded(text) => write_scalar(text.as_str(), &mut self.out),
        }
    }

    /// A string token; borrowed from the text when it has no escape sequence.
    #[inline(always)]
    fn string(&mut self) -> Option<Text<'a>> {
        let input = self.input;
        let start = self.pos + 1;
        let (mut i, ascii) = plain_run(input, start);
        if *input.get(i)? == b'"' {
            let text = &input[start..i];
            if !ascii {
                std::str::from_utf8(text).ok()?;
            }
            self.pos = i + 1;
            return Some(Text::Plain(text));
        }
        // An escape sequence (or a control character, which serde_json rejects below): find the
        // closing quote, then let serde_json decode the token.
        loop {
            match *input.get(i)? {
                b'"' => break,
                b'\\' => i += 2,
                _ => i += 1,
            }
        }
        let decoded: String = serde_json::from_slice(&input[self.pos..=i]).ok()?;
        self.pos = i + 1;
        Some(Text::Decoded(decoded))
    }

    #[inline(always)]
    fn number(&mut self) -> Option<()> {
        let input = self.input;
        let start = self.pos;
        let digits = |mut i: usize| {
            while let Some(b'0'..=b'9') = input.get(i) {
                i += 1;
            }
            i
        };
        let mut i = start;
        if input[i] == b'-' {
            i += 1;
        }
        i = match input.get(i)? {
            b'0' => i + 1,
            b'1'..=b'9' => digits(i + 1),
            _ => return None,
        };
        let integer_len = i - start;
        let mut plain = true;
        if input.get(i) == Some(&b'.') {
            plain = false;
            let end = digits(i + 1);
            (end > i + 1).then_some(())?;
            i = end;
        }
        if let Some(b'e' | b'E') = input.get(i) {
            plain = false;
            i += 1;
            if let Some(b'+' | b'-') = input.get(i) {
                i += 1;
            }
            let end = digits(i);
            (end > i).then_some(())?;
            i = end;
        }
        let token = &input[start..i];
        self.pos = i;
        if plain && integer_len <= 18 && token != b"-0" {
            // Fits an i64 (or u64), which serde_json writes back digit for digit.
            append(&mut self.out, input, start..i);
        } else {
            let number: serde_json::Number = serde_json::from_slice(token).ok()?;
            let start = self.out.len();
            write_scalar(&number, &mut self.out);
            let written = &self.out[start..];
            // Most numbers come as serde_json writes them, and are then exact.
            self.lossless &= written == token || Decimal::of(token) == Decimal::of(written);
        }
        Some(())
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        self.out.push(b'[');
        self.skip_whitespace();
        if self.peek()? == b']' {
            self.pos += 1;
            self.out.push(b']');
            return Some(());
        }
        loop {
            self.element(depth)?;
            self.skip_whitespace();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.out.push(b',');
                    self.skip_whitespace();
                }
                b']' => {
                    self.pos += 1;
                    self.out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        let open = self.out.len();
        self.out.push(b'{');
        self.skip_whitespace();
        if self.peek()? == b'}' {
            self.pos += 1;
            self.out.push(b'}');
            return Some(());
        }
        let base = self.members.len();
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            if self.members.len() > base {
                self.out.push(b',');
            }
            let start = self.out.len();
            let key_start = self.pos;
            let key = self.string()?;
            self.write_string(&key, key_start);
            let prefix = match &key {
                // The key's bytes begin just after its opening quote.
                Text::Plain(text) => prefix_of(self.input, key_start + 1, text.len()),
                Text::Decoded(text) => prefix_of(text.as_bytes(), 0, text.len()),
            };
            self.out.push(b':');
            self.skip_whitespace();
            if self.peek()? != b':' {
                return None;
            }
            self.pos += 1;
            self.skip_whitespace();
            self.element(depth)?;
            self.members.push(Member {
                prefix,
                key,
                text: start..self.out.len(),
            });
            self.skip_whitespace();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.skip_whitespace();
                }
                b'}' => {
                    self.pos += 1;
                    break;
                }
                _ => return None,
            }
        }
        let Self {
            out,
            members,
            scratch,
            lossless,
            defer_outermost,
            outermost_deferred,
            ..
        } = self;
        let object = &mut members[base..];
        // A stable sort keeps duplicates in arrival order; the last of each run wins.
        if sort_members(object) {
            if open == 0 && *defer_outermost {
                // A repeated key makes the form lossy, and then no one reads it: nothing to
                // drop.
                if object
                    .windows(2)
                    .any(|pair| pair[0].key_cmp(&pair[1]).is_eq())
                {
                    *lossless = false;
                }
                *outermost_deferred = true;
                return Some(());
            }
            // The members in key order, straight from `out` into `scratch`.
            scratch.clear();
            scratch.reserve(out.len() - open);
            scratch.push(b'{');
            for (i, member) in object.iter().enumerate() {
                if object
                    .get(i + 1)
                    .is_some_and(|next| next.key_cmp(member).is_eq())
                {
                    *lossless = false;
                    continue;
                }
                if scratch.len() > 1 {
                    scratch.push(b',');
                }
                append(scratch, out, member.text.clone());
            }
            if open == 0 {
                // The outermost object is all of `out`: take the sorted copy in its place
                // rather than copying it back.
                std::mem::swap(out, scratch);
            } else {
                out.truncate(open);
                out.extend_from_slice(scratch);
            }
        }
        out.push(b'}');
        members.truncate(base);
        Some(())
    }
}

impl Canonicalizer<'_> {
    /// Hands the canonical form to `write` in order, in one piece or (when the outermost object
    /// was deferred) a piece per member and separator.
    fn pieces(&self, mut write: impl FnMut(&[u8])) {
        if !self.outermost_deferred {
            write(&self.out);
            return;
        }
        write(b"{");
        for (i, member) in self.members.iter().enumerate() {
            if i > 0 {
                write(b",");
            }
            write(&self.out[member.text.clone()]);
        }
        write(b"}");
    }
}

mod buffers;
mod decimal;
mod members;
mod tokens;
pub(crate) use buffers::with_lossless_canonical;
use decimal::Decimal;
use members::{Member, Text, prefix_of, sort_members};
use tokens::{append, plain_run, write_scalar};

#[cfg(test)]
pub(crate) mod tests;
