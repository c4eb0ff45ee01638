//! [`Decimal`]: the exact value of a JSON number text, to tell whether its canonical form (as
//! `serde_json` writes it back) still has the value it was sent with.

/// The value of a JSON number text, exactly: its sign, its significant digits (no leading or
/// trailing zeros) and the power of ten of the last one; zero, whatever its sign or form, is
/// `Zero`. So `1E2`, `100` and `100.0` are equal, and `0.1` and `0.10000000000000000001` are
/// not. Exponents are taken up to 10^15 in size, far past any a double reaches.
#[derive(PartialEq, Eq)]
pub(super) enum Decimal {
    Zero,
    NonZero {
        negative: bool,
        digits: Vec<u8>,
        exponent: i64,
    },
}

impl Decimal {
    /// `text` must be a valid JSON number.
    pub(super) fn of(text: &[u8]) -> Self {
        let (negative, text) = match text {
            [b'-', rest @ ..] => (true, rest),
            _ => (false, text),
        };
        let split = text
            .iter()
            .position(|b| matches!(b, b'e' | b'E'))
            .unwrap_or(text.len());
        let (mantissa, exponent_text) = text.split_at(split);
        let mut exponent: i64 = 0;
        let mut exponent_negative = false;
        for &b in exponent_text.iter().skip(1) {
            match b {
                b'-' => exponent_negative = true,
                b'0'..=b'9' => {
                    exponent = (exponent * 10 + i64::from(b - b'0')).min(1_000_000_000_000_000);
                }
                _ => {}
            }
        }
        if exponent_negative {
            exponent = -exponent;
        }
        let (integer, fraction) = match mantissa.iter().position(|&b| b == b'.') {
            Some(dot) => (&mantissa[..dot], &mantissa[dot + 1..]),
            None => (mantissa, &[][..]),
        };
        exponent -= fraction.len() as i64;
        let mut digits: Vec<u8> = integer.iter().chain(fraction).copied().collect();
        while digits.last() == Some(&b'0') {
            digits.pop();
            exponent += 1;
        }
        let leading = digits.iter().take_while(|&&b| b == b'0').count();
        if leading == digits.len() {
            return Decimal::Zero;
        }
        digits.drain(..leading);
        Decimal::NonZero {
            negative,
            digits,
            exponent,
        }
    }
}
