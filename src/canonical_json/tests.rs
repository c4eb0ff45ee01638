//! Unit tests of the canonical JSON scanner: fixed cases, and properties against a reference
//! that parses into a `serde_json::Value` and writes it with sorted keys.

use super::*;

#[test]
fn canonical_json_sorts_keys_and_drops_whitespace() {
    let a = canonical_json(br#"{ "b": [1, 2, {"d": 1, "c": "x"}], "a": "\u0041" }"#).unwrap();
    assert_eq!(a, br#"{"a":"A","b":[1,2,{"c":"x","d":1}]}"#);
    assert_ne!(
        canonical_json(b"[1,2]").unwrap(),
        canonical_json(b"[2,1]").unwrap()
    );
    assert!(canonical_json(b"{not json").is_none());
}

/// The canonical form as first written: parse into a `serde_json::Value`, then write it
/// with sorted keys. `canonical_json` must give the same bytes (stored fingerprints stay
/// valid), without building the tree.
pub(crate) fn reference(body: &[u8]) -> Option<Vec<u8>> {
    fn write(value: &serde_json::Value, out: &mut Vec<u8>) {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                out.push(b'{');
                for (i, (key, value)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_scalar(key, out);
                    out.push(b':');
                    write(value, out);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(item, out);
                }
                out.push(b']');
            }
            scalar => write_scalar(scalar, out),
        }
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut out = Vec::new();
    write(&value, &mut out);
    Some(out)
}

#[test]
fn canonical_json_matches_the_reference_on_edge_cases() {
    let nested = |n: usize| "[".repeat(n) + &"]".repeat(n);
    let cases: Vec<String> = [
        r#"{"a":1,"a":2}"#,
        r#"{"b":1,"a":{"x":1},"a":3,"c":[{"z":0,"y":[]}]}"#,
        r#"{"é":1,"e":2,"\u00e9x":3,"E":4,"":5}"#,
        r#"["\ud83d\ude00","\u0000\t\n\"\\/","é😀"]"#,
        "[1.0, 1e2, 1E-7, -0, -0.0, 0.1, 12345678901234567890, 18446744073709551616, -9223372036854775809]",
        "[1e400]",
        "[0, -1, 123456789012345678, -123456789012345678, 1234567890123456789, -1234567890123456789]",
        r#"{"b":{"d":1,"c":2},"a":[{"z":1,"y":2}],"c":"\\"}"#,
        r#"{"\u0062":1,"a":2,"b":3}"#,
        "[\"\u{7f}\", \"\\u00\", \"\\x\", \"\\\"]",
        r#"["\ud800"]"#,
        "  {\"a\" : [ true , false , null ] }  ",
        "{} ",
        "[]",
        "\"text\"",
        "17",
        "null",
        "[1,]",
        "{\"a\":1,}",
        "{\"a\":1} x",
        "",
    ]
    .into_iter()
    .map(String::from)
    .chain([nested(127), nested(128), nested(129)])
    .chain(
        [
            "9223372036854775807", "-9223372036854775808", "18446744073709551615", "00",
            "01", "-", "-a", "1.", ".5", "+1", "1e", "1e+", "2E-0", "1.5e3", "0e0", "-0e0",
            "0.0", "1E+2", "100000000000000000000000", "123.456e-789", "tru", "nul", "fals",
            "truee", "nulll", "1 2", "[1 2]", "{\"a\" 1}", "{\"a\":1 \"b\":2}", "{1:2}",
        ]
        .into_iter()
        .flat_map(|token| [token.to_owned(), format!("[{token}]"), format!("{{\"k\":{token}}}")]),
    )
    .collect();
    for case in &cases {
        assert_eq!(
            canonical_json(case.as_bytes()),
            reference(case.as_bytes()),
            "{case}"
        );
    }
    assert_eq!(canonical_json(br#"{"a":1,"a":2}"#).unwrap(), br#"{"a":2}"#);
    assert!(canonical_json(nested(127).as_bytes()).is_some());
    assert!(canonical_json(nested(128).as_bytes()).is_none());
}

/// Out-of-order objects are rewritten in key order: the outermost one in place of the whole
/// output, a nested one back where it began, after others have been rewritten before it.
#[test]
fn out_of_order_objects_are_rewritten_at_every_depth() {
    let cases: [(&[u8], &[u8], bool); 7] = [
        (br#"{"b":1,"a":2}"#, br#"{"a":2,"b":1}"#, true),
        (
            br#"{"z":{"y":[{"b":1,"a":2}],"x":0},"a":{"d":1,"c":2}}"#,
            br#"{"a":{"c":2,"d":1},"z":{"x":0,"y":[{"a":2,"b":1}]}}"#,
            true,
        ),
        (
            br#"[{"b":1,"a":2},{"d":"dd","c":"c"},{"a":0}]"#,
            br#"[{"a":2,"b":1},{"c":"c","d":"dd"},{"a":0}]"#,
            true,
        ),
        (br#"{"b":1,"a":2,"b":3}"#, br#"{"a":2,"b":3}"#, false),
        (br#"{"b":1,"b":2,"a":3}"#, br#"{"a":3,"b":2}"#, false),
        (
            br#"[1,{"b":{"d":1,"c":2,"d":3},"a":[]}]"#,
            br#"[1,{"a":[],"b":{"c":2,"d":3}}]"#,
            false,
        ),
        (
            br#"{"b":"\u0041","a":"\n"}"#,
            br#"{"a":"\n","b":"A"}"#,
            true,
        ),
    ];
    for (body, canonical, lossless) in cases {
        let text = String::from_utf8_lossy(body);
        assert_eq!(
            canonicalize(body),
            Some((canonical.to_vec(), lossless)),
            "{text}"
        );
        assert_eq!(canonical_json(body), reference(body), "{text}");
    }
}

#[test]
fn a_key_named_like_serde_json_internals_is_an_ordinary_key() {
    // With serde_json's `raw_value` feature on (axum turns it on), parsing into a `Value`
    // treats this key as a marker and returns the parsed string instead, so the two bodies
    // below collided.
    let marker = br#"{"$serde_json::private::RawValue":"[1,2]"}"#;
    assert_eq!(canonical_json(marker).unwrap(), marker);
    assert_ne!(canonical_json(marker), canonical_json(b"[1,2]"));
}

pub(crate) fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec(("[a-c]{0,2}|\\PC{0,4}", inner), 0..8)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

proptest::proptest! {
    /// Accepts and rejects exactly what serde_json does, on near-JSON text.
    #[test]
    fn canonical_json_accepts_what_the_reference_accepts(
        text in r#"[\[\]{}",: 0-9eE.+\-a\\u\ttrufalsn\x00\x7fé]{0,24}"#,
    ) {
        proptest::prop_assert_eq!(canonical_json(text.as_bytes()), reference(text.as_bytes()));
    }

    /// The same on JSON documents with one byte changed.
    #[test]
    fn canonical_json_matches_the_reference_on_damaged_json(
        value in json_value(),
        at: proptest::sample::Index,
        byte in proptest::prop_oneof![
            proptest::sample::select(b"[]{}\",:\\.-+eE0 tn".to_vec()),
            proptest::prelude::any::<u8>(),
        ],
    ) {
        let mut text = serde_json::to_vec(&value).unwrap();
        let at = at.index(text.len());
        text[at] = byte;
        proptest::prop_assert_eq!(canonical_json(&text), reference(&text));
    }

    #[test]
    fn canonical_json_matches_the_reference(value in json_value(), pretty: bool) {
        let text = if pretty {
            serde_json::to_vec_pretty(&value).unwrap()
        } else {
            serde_json::to_vec(&value).unwrap()
        };
        proptest::prop_assert_eq!(canonical_json(&text), reference(&text));
    }
}

/// `plain_run` byte by byte, the way it is specified.
fn plain_run_reference(input: &[u8], start: usize) -> (usize, bool) {
    let end = input[start..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map_or(input.len(), |n| start + n);
    (end, input[start..end].is_ascii())
}

#[test]
fn plain_run_stops_at_the_first_quote_backslash_or_control_character() {
    // Every byte value at every position of the first chunks, behind bytes that make the bit
    // tricks borrow (0x00, 0x01, 0x20, 0x21, '"' + 1, '\\' + 1) or carry non-ASCII.
    let fillers: [&[u8]; 4] = [
        b"abcdefghijklmnopqrstuvwx",
        &[0x01; 24],
        &[0x21; 24],
        &[0xc3; 24],
    ];
    for filler in fillers {
        for position in 0..20 {
            for byte in 0..=255u8 {
                for (before, value) in [
                    (None, byte),
                    (Some(0x00), byte),
                    (Some(b'#'), byte),
                    (Some(b']'), byte),
                ] {
                    let mut input = filler.to_vec();
                    input[position] = value;
                    if let Some(before) = before
                        && position > 0
                    {
                        input[position - 1] = before;
                    }
                    for start in 0..3 {
                        assert_eq!(
                            plain_run(&input, start),
                            plain_run_reference(&input, start),
                            "{input:?} from {start}"
                        );
                    }
                }
            }
        }
    }
}

/// Objects count towards serde_json's nesting limit as arrays do: 127 levels parse, 128 do
/// not, whether the levels are objects or objects and arrays in turn.
#[test]
fn nested_objects_stop_at_the_same_depth_as_arrays() {
    let objects = |n: usize| r#"{"a":"#.repeat(n) + "0" + &"}".repeat(n);
    let mixed = |n: usize| {
        let open: String = (0..n)
            .map(|i| if i % 2 == 0 { r#"{"a":"# } else { "[" })
            .collect();
        let close: String = (0..n)
            .rev()
            .map(|i| if i % 2 == 0 { "}" } else { "]" })
            .collect();
        open + "0" + &close
    };
    for n in [127, 128, 129] {
        for case in [objects(n), mixed(n)] {
            assert_eq!(
                canonical_json(case.as_bytes()),
                reference(case.as_bytes()),
                "{n} levels"
            );
            assert_eq!(
                canonical_json(case.as_bytes()).is_some(),
                n < 128,
                "{n} levels"
            );
        }
    }
}

/// A number that serde_json writes in another form keeps its value (`1E2` is written
/// `100.0`), and the body stays lossless; one that serde_json rounds makes the whole body
/// lossy, wherever it stands among exact ones.
#[test]
fn numbers_written_in_another_form_are_lossless_when_their_value_is_kept() {
    let cases: [(&str, bool); 16] = [
        ("1E2", true),
        ("1e+2", true),
        ("1E12", true),
        ("1E-2", true),
        ("-1E-1", true),
        ("-0.5e1", true),
        ("1.5e1", true),
        ("2.50", true),
        ("[1E2, 0.5, -1E-1]", true),
        ("0.10000000000000000001", false),
        ("-0.10000000000000000001", false),
        ("12345678901234567890123", false),
        ("1e-400", false),
        ("[0.10000000000000000001, 0.5]", false),
        ("[0.5, 0.10000000000000000001]", false),
        (r#"{"b":0.10000000000000000001,"a":1E2}"#, false),
    ];
    for (body, lossless) in cases {
        assert_eq!(
            canonicalize(body.as_bytes()).map(|(_, lossless)| lossless),
            Some(lossless),
            "{body}"
        );
        assert_eq!(
            canonical_json(body.as_bytes()),
            reference(body.as_bytes()),
            "{body}"
        );
    }
}

/// `Decimal` compares number texts by their exact value, whatever their form.
#[test]
fn decimals_are_equal_exactly_when_their_values_are() {
    let equal = [
        ("1E2", "100"),
        ("1E2", "100.0"),
        ("1e+2", "100.000"),
        ("1E12", "1000000000000"),
        ("1E-2", "0.01"),
        ("-1e-1", "-0.1"),
        ("-0.5E1", "-5"),
        ("1.5e1", "15"),
        ("0.0012e3", "1.2"),
        ("120e-1", "12"),
        ("0", "-0.0"),
        ("0e7", "0.000"),
    ];
    let different = [
        ("-1", "1"),
        ("1", "2"),
        ("12", "120"),
        ("1", "0"),
        ("1E2", "1E-2"),
        ("1E2", "10"),
        ("1E12", "1E21"),
        ("0.1", "0.10000000000000000001"),
        ("1e-400", "0"),
    ];
    for (a, b) in equal {
        assert!(
            Decimal::of(a.as_bytes()) == Decimal::of(b.as_bytes()),
            "{a} == {b}"
        );
    }
    for (a, b) in different {
        assert!(
            Decimal::of(a.as_bytes()) != Decimal::of(b.as_bytes()),
            "{a} != {b}"
        );
    }
}

/// A string of bytes that are not UTF-8 is not JSON, short or long: `plain_run` reports the
/// non-ASCII bytes of a short string's byte-by-byte tail as it does those of a chunk.
#[test]
fn a_string_that_is_not_utf8_is_not_json() {
    for n in 1..20 {
        for byte in [0x80u8, 0xbf, 0xc3, 0xff] {
            let mut body = vec![b'"'];
            body.extend(std::iter::repeat_n(byte, n));
            body.push(b'"');
            assert_eq!(canonical_json(&body), None, "{body:?}");
            assert_eq!(
                plain_run(&body, 1),
                plain_run_reference(&body, 1),
                "{body:?}"
            );
        }
    }
}
