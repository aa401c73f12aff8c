//! The decoder on real replies split at every byte, on every error, on hostile sizes, and on
//! arbitrary bytes in arbitrary chunks (no panic, bounded buffer).

use proptest::prelude::*;

use super::*;

/// Feeds `chunks` one by one, collecting values until the first error.
fn decode_chunks(limits: Limits, chunks: &[&[u8]]) -> Result<Vec<Value>, RespError> {
    let mut dec = Decoder::new(limits);
    let mut out = Vec::new();
    for chunk in chunks {
        dec.feed(chunk);
        while let Some(v) = dec.decode()? {
            out.push(v);
        }
        assert!(dec.buffered() <= limits.max_buffered());
    }
    Ok(out)
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Value>, RespError> {
    decode_chunks(Limits::default(), &[bytes])
}

fn bulk(s: &str) -> Value {
    Value::Bulk(s.as_bytes().to_vec())
}

/// Real replies (from redis-server 7.0 on the wire) and what they decode to.
fn samples() -> Vec<(&'static [u8], Value)> {
    vec![
        (b"+OK\r\n", Value::Simple(b"OK".to_vec())),
        (
            b"+1795831163.631456 [0 10.77.0.20:44474] \"AUTH\" \"(redacted)\"\r\n",
            Value::Simple(
                b"1795831163.631456 [0 10.77.0.20:44474] \"AUTH\" \"(redacted)\"".to_vec(),
            ),
        ),
        (
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
            Value::Error(
                b"WRONGPASS invalid username-password pair or user is disabled.".to_vec(),
            ),
        ),
        (b":0\r\n", Value::Integer(0)),
        (b":-42\r\n", Value::Integer(-42)),
        (
            b":9223372036854775807\r\n",
            Value::Integer(9_223_372_036_854_775_807),
        ),
        (
            b":-9223372036854775808\r\n",
            Value::Integer(-9_223_372_036_854_775_808),
        ),
        (b"$0\r\n\r\n", Value::Bulk(Vec::new())),
        (b"$-1\r\n", Value::Null),
        (b"*-1\r\n", Value::Null),
        (b"*0\r\n", Value::Array(Vec::new())),
        (b"$5\r\na\r\nb\0\r\n", Value::Bulk(b"a\r\nb\0".to_vec())),
        (
            b"*1\r\n*14\r\n$5\r\ncount\r\n:1\r\n$6\r\nreason\r\n$4\r\nauth\r\n$7\r\ncontext\r\n$8\r\ntoplevel\r\n$6\r\nobject\r\n$4\r\nAUTH\r\n$8\r\nusername\r\n$7\r\ndefault\r\n$11\r\nage-seconds\r\n$5\r\n0.016\r\n$11\r\nclient-info\r\n$27\r\nid=4 addr=127.0.0.1:45996 x\r\n",
            Value::Array(vec![Value::Array(vec![
                bulk("count"),
                Value::Integer(1),
                bulk("reason"),
                bulk("auth"),
                bulk("context"),
                bulk("toplevel"),
                bulk("object"),
                bulk("AUTH"),
                bulk("username"),
                bulk("default"),
                bulk("age-seconds"),
                bulk("0.016"),
                bulk("client-info"),
                bulk("id=4 addr=127.0.0.1:45996 x"),
            ])]),
        ),
        (
            b"*3\r\n*0\r\n$-1\r\n*2\r\n:1\r\n+x\r\n",
            Value::Array(vec![
                Value::Array(Vec::new()),
                Value::Null,
                Value::Array(vec![Value::Integer(1), Value::Simple(b"x".to_vec())]),
            ]),
        ),
    ]
}

#[test]
fn decodes_samples_whole_and_split_at_every_byte() {
    for (bytes, want) in samples() {
        assert_eq!(decode_all(bytes).unwrap(), vec![want.clone()], "{bytes:?}");
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(
                decode_chunks(Limits::default(), &[a, b]).unwrap(),
                vec![want.clone()],
                "{bytes:?} split at {at}"
            );
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(
            decode_chunks(Limits::default(), &singles).unwrap(),
            vec![want]
        );
    }
}

#[test]
fn decodes_pipelined_values_in_order() {
    let mut all = Vec::new();
    let mut want = Vec::new();
    for (bytes, value) in samples() {
        all.extend_from_slice(bytes);
        want.push(value);
    }
    assert_eq!(decode_all(&all).unwrap(), want);
    let singles: Vec<&[u8]> = all.chunks(1).collect();
    assert_eq!(decode_chunks(Limits::default(), &singles).unwrap(), want);
}

#[test]
fn incomplete_input_waits() {
    for bytes in [
        &b"+OK"[..],
        b"+OK\r",
        b"$5\r\nab",
        b"$5\r\nabcde",
        b"$5\r\nabcde\r",
        b"*2\r\n:1\r\n",
        b":12",
        b"*",
    ] {
        assert_eq!(decode_all(bytes).unwrap(), Vec::new(), "{bytes:?}");
    }
}

#[test]
fn rejects_invalid_input() {
    let cases: &[(&[u8], RespError)] = &[
        (b"!3\r\nabc\r\n", RespError::InvalidType(b'!')),
        (b"%1\r\n", RespError::InvalidType(b'%')),
        (b"\r\n", RespError::InvalidType(b'\r')),
        (
            b"$abc\r\n",
            RespError::BadHeader {
                what: "bulk length",
            },
        ),
        (
            b"$\r\n",
            RespError::BadHeader {
                what: "bulk length",
            },
        ),
        (
            b"$+3\r\nabc\r\n",
            RespError::BadHeader {
                what: "bulk length",
            },
        ),
        (
            b"$-2\r\n",
            RespError::BadHeader {
                what: "bulk length",
            },
        ),
        (
            b"*-2\r\n",
            RespError::BadHeader {
                what: "array length",
            },
        ),
        (b":1 \r\n", RespError::BadHeader { what: "integer" }),
        (b":1\n", RespError::BadHeader { what: "integer" }),
        (
            b":9223372036854775808\r\n",
            RespError::BadHeader { what: "integer" },
        ),
        (
            b"$99999999999999999999\r\n",
            RespError::BadHeader {
                what: "bulk length",
            },
        ),
        (
            b":0000000000000000000000000",
            RespError::BadHeader { what: "integer" },
        ),
        (b"$3\r\nabcd\r\n", RespError::MissingCrlf),
        (b"$3\r\nabc\n\n", RespError::MissingCrlf),
    ];
    for (bytes, want) in cases {
        assert_eq!(decode_all(bytes).unwrap_err(), *want, "{bytes:?}");
    }
}

#[test]
fn huge_declared_sizes_fail_before_allocating() {
    let limits = Limits::default();
    let mut dec = Decoder::new(limits);
    dec.feed(b"$67108865\r\n");
    assert_eq!(
        dec.decode().unwrap_err(),
        RespError::TooLarge {
            what: "bulk string",
            len: 67_108_865,
            max: 64 * 1024 * 1024
        }
    );
    let mut dec = Decoder::new(limits);
    dec.feed(b"*9223372036854775807\r\n");
    assert_eq!(
        dec.decode().unwrap_err(),
        RespError::TooLarge {
            what: "array",
            len: 9_223_372_036_854_775_807,
            max: 1024 * 1024
        }
    );
    // Within the limits but never sent: waits with only the header buffered.
    let mut dec = Decoder::new(limits);
    dec.feed(b"$67108864\r\n");
    assert_eq!(dec.decode().unwrap(), None);
    assert_eq!(dec.buffered(), 11);
    let mut dec = Decoder::new(limits);
    dec.feed(b"*1048576\r\n");
    assert_eq!(dec.decode().unwrap(), None);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn nesting_and_value_size_are_bounded() {
    let limits = Limits {
        max_depth: 3,
        ..Limits::default()
    };
    assert_eq!(
        decode_chunks(limits, &[b"*1\r\n*1\r\n*1\r\n:1\r\n"]).unwrap(),
        vec![Value::Array(vec![Value::Array(vec![Value::Array(vec![
            Value::Integer(1)
        ])])])]
    );
    assert_eq!(
        decode_chunks(limits, &[b"*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n"]).unwrap_err(),
        RespError::TooDeep { max: 3 }
    );

    // Many small items add up: each counts its bytes and its element size.
    let limits = Limits {
        max_value: 1024,
        ..Limits::default()
    };
    let mut many = b"*1000\r\n".to_vec();
    for _ in 0..1000 {
        many.extend_from_slice(b":1\r\n");
    }
    assert!(matches!(
        decode_chunks(limits, &[&many]).unwrap_err(),
        RespError::TooLarge { what: "value", .. }
    ));
    // The count restarts with each top-level value.
    let mut small = Vec::new();
    for _ in 0..100 {
        small.extend_from_slice(b"*2\r\n:1\r\n$3\r\nabc\r\n");
    }
    assert_eq!(decode_chunks(limits, &[&small]).unwrap().len(), 100);
}

#[test]
fn long_status_lines_keep_a_bounded_prefix() {
    let limits = Limits {
        max_inline: 16,
        ..Limits::default()
    };
    let long =
        b"+0123456789abcdefXYZ-the-rest-is-discarded\r\n+OK\r\n-ERR 0123456789abcdefghij\r\n";
    let want = vec![
        Value::LongSimple(b"0123456789abcdef".to_vec()),
        Value::Simple(b"OK".to_vec()),
        Value::Error(b"ERR 0123456789ab".to_vec()),
    ];
    assert_eq!(decode_chunks(limits, &[long]).unwrap(), want);
    for at in 0..=long.len() {
        let (a, b) = long.split_at(at);
        assert_eq!(decode_chunks(limits, &[a, b]).unwrap(), want, "split {at}");
    }
    let singles: Vec<&[u8]> = long.chunks(1).collect();
    assert_eq!(decode_chunks(limits, &singles).unwrap(), want);

    // A 10 MB line arriving in 64 KiB reads never holds more than a prefix and one read.
    let mut dec = Decoder::new(Limits::default());
    let chunk = vec![b'a'; 64 * 1024];
    dec.feed(b"+");
    for _ in 0..160 {
        dec.feed(&chunk);
        assert_eq!(dec.decode().unwrap(), None);
        assert!(dec.buffered() <= 64 * 1024 + 2);
    }
    dec.feed(b"\r\n");
    match dec.decode().unwrap() {
        Some(Value::LongSimple(kept)) => assert_eq!(kept.len(), 64 * 1024),
        other => panic!("{other:?}"),
    }
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn encodes_commands() {
    assert_eq!(
        encode_command(&[b"AUTH", b"mirage", b"p w"]),
        b"*3\r\n$4\r\nAUTH\r\n$6\r\nmirage\r\n$3\r\np w\r\n".to_vec()
    );
    assert_eq!(encode_command(&[]), b"*0\r\n".to_vec());
}

/// Small limits so that the hostile cases hit them.
fn small_limits() -> Limits {
    Limits {
        max_bulk: 64,
        max_inline: 32,
        max_elements: 16,
        max_depth: 4,
        max_value: 4096,
    }
}

fn value_strategy() -> impl Strategy<Value = Value> {
    let line = proptest::collection::vec(
        any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
        0..32,
    );
    let leaf = prop_oneof![
        line.clone().prop_map(Value::Simple),
        line.prop_map(Value::Error),
        any::<i64>().prop_map(Value::Integer),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Value::Bulk),
        Just(Value::Null),
    ];
    leaf.prop_recursive(3, 48, 8, |inner| {
        proptest::collection::vec(inner, 0..8).prop_map(Value::Array)
    })
}

/// Cuts `bytes` at the given points (taken modulo its length, sorted).
fn split_at_points(bytes: &[u8], points: &[usize]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = points
        .iter()
        .map(|p| if bytes.is_empty() { 0 } else { p % bytes.len() })
        .collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut from = 0;
    for cut in cuts {
        out.push(bytes[from..cut].to_vec());
        from = cut;
    }
    out.push(bytes[from..].to_vec());
    out
}

/// Feeds chunks, never panicking, checking the buffer bound after every `None`; stops at the
/// first error.
fn feed_hostile(limits: Limits, chunks: &[Vec<u8>]) -> Result<Vec<Value>, RespError> {
    let mut dec = Decoder::new(limits);
    let mut out = Vec::new();
    for chunk in chunks {
        dec.feed(chunk);
        while let Some(v) = dec.decode()? {
            out.push(v);
        }
        assert!(
            dec.buffered() <= limits.max_buffered(),
            "buffered {} > {}",
            dec.buffered(),
            limits.max_buffered()
        );
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_in_arbitrary_chunks_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        points in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let _ = feed_hostile(small_limits(), &split_at_points(&bytes, &points));
    }

    #[test]
    fn protocol_shaped_bytes_never_panic(
        parts in proptest::collection::vec(prop_oneof![
            Just(b"*".to_vec()), Just(b"$".to_vec()), Just(b"+".to_vec()), Just(b"-".to_vec()),
            Just(b":".to_vec()), Just(b"\r\n".to_vec()), Just(b"\r".to_vec()), Just(b"\n".to_vec()),
            Just(b"-1".to_vec()), Just(b"99999999999".to_vec()),
            (0u32..100).prop_map(|n| n.to_string().into_bytes()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ], 0..64),
        points in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let bytes = parts.concat();
        let _ = feed_hostile(small_limits(), &split_at_points(&bytes, &points));
    }

    #[test]
    fn mutated_valid_streams_never_panic(
        values in proptest::collection::vec(value_strategy(), 1..4),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        points in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut bytes = Vec::new();
        for v in &values {
            encode(v, &mut bytes);
        }
        for (at, b) in flips {
            let at = at % bytes.len();
            bytes[at] = b;
        }
        let _ = feed_hostile(small_limits(), &split_at_points(&bytes, &points));
    }

    #[test]
    fn encoded_values_round_trip_in_any_chunks(
        values in proptest::collection::vec(value_strategy(), 0..4),
        points in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut bytes = Vec::new();
        for v in &values {
            encode(v, &mut bytes);
        }
        let limits = Limits { max_value: 1 << 20, ..small_limits() };
        prop_assert_eq!(feed_hostile(limits, &split_at_points(&bytes, &points)).unwrap(), values);
    }
}
