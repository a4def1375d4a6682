//! Arbitrary bytes as the start of a connection with `--accept-proxy`: the PROXY header parser
//! must never panic, never claim more bytes than it was given or than the spec allows, give the
//! same answer for the header alone, and a v2 `PROXY` header it accepts must re-encode (as
//! `--send-proxy v2` would pass it on) into one that parses the same.

#![no_main]

use holdfast::fuzzing::{Command, Parse, V1_MAX_LEN, V2_MAX_LEN, encode_v1, encode_v2, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Parse::Incomplete { need_at_least } => {
            assert!(need_at_least > data.len());
            assert!(need_at_least <= V2_MAX_LEN);
        }
        Parse::Invalid(reason) => assert!(!reason.as_str().is_empty()),
        Parse::Done { header, len } => {
            assert!(len <= data.len());
            let v1 = data[0] == b'P';
            assert!(len <= if v1 { V1_MAX_LEN } else { V2_MAX_LEN });
            // Nothing past the header was looked at.
            let alone = parse(&data[..len]);
            assert_eq!(
                alone,
                Parse::Done {
                    header: header.clone(),
                    len
                }
            );
            // Shorter prefixes are incomplete, with a bound the header meets.
            for cut in [0, len / 2, len - 1] {
                match parse(&data[..cut]) {
                    Parse::Incomplete { need_at_least } => {
                        assert!(need_at_least > cut && need_at_least <= len)
                    }
                    other => panic!("prefix of {cut} bytes of a {len}-byte header: {other:?}"),
                }
            }
            if v1 {
                if let Some((source, destination)) = header.addresses {
                    let again = encode_v1(source, destination);
                    assert_eq!(
                        parse(&again),
                        Parse::Done {
                            header,
                            len: again.len()
                        }
                    );
                }
            } else if header.command == Command::Proxy {
                let again = encode_v2(header.command, header.addresses, &header.tlvs);
                assert_eq!(
                    parse(&again),
                    Parse::Done {
                        header,
                        len: again.len()
                    }
                );
            }
        }
    }
});
