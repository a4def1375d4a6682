//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): a pure parser and
//! the encoders, with no I/O.
//!
//! A proxy in front of holdfast (or holdfast in front of a backend) prepends one header to a TCP
//! connection saying who the real client is: the address the client connected from and the
//! address it connected to. Everything after the header is the client's stream, untouched.
//!
//! # The two formats
//!
//! **Version 1** is one line of ASCII, at most 107 bytes including the CRLF:
//!
//! ```text
//! PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n
//! PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n
//! PROXY UNKNOWN\r\n                       (anything may follow UNKNOWN up to the CRLF)
//! ```
//!
//! Exactly one space between fields; IPv4 as four decimal numbers without leading zeros; ports
//! decimal `0..=65535` without leading zeros; the line ends with CRLF (a lone CR or LF is an
//! error); a line with no CRLF in its first 107 bytes is invalid. `UNKNOWN` means "use the
//! connection's own addresses".
//!
//! **Version 2** is binary: the 12-byte signature `\r\n\r\n\0\r\nQUIT\n`, a version/command byte
//! (high nibble must be 2; low nibble 0 = `LOCAL`, 1 = `PROXY`, anything else is rejected), a
//! family/transport byte, a big-endian `u16` length of what follows, then the address block and
//! TLVs (type, `u16` length, value). The header is exactly `16 + length` bytes.
//!
//! - `LOCAL`: the sender opened the connection itself (a health check). The receiver uses the
//!   connection's own addresses and ignores the rest, family included, but must still skip
//!   `length` bytes: senders may include an address block. Its TLVs are not kept.
//! - `PROXY` with family/transport `0x11` (TCP over IPv4, 12-byte block) or `0x21` (TCP over
//!   IPv6, 36 bytes): the addresses are the client's. `0x12`/`0x22` (UDP) and `0x31`/`0x32`
//!   (UNIX, 216 bytes) are valid but mean nothing to a TCP balancer: their addresses are
//!   reported as unknown (`None`), as the spec allows ("fall back to UNSPEC"). `0x00` (UNSPEC)
//!   has an empty address block (what senders emit) and also means unknown. Any other value is
//!   rejected ([`Reason::Family`]); so is a length shorter than the family's address block
//!   ([`Reason::Length`]).
//! - After the address block come TLVs, which must be well formed (each one complete, within
//!   the declared length: [`Reason::Tlv`]). They are kept raw in [`ProxyHeader::tlvs`] so that
//!   a v2 sender can pass them on unchanged. One exception: a `PP2_TYPE_CRC32C` TLV (type 3) is
//!   a checksum of the header it arrived in, so it is verified ([`Reason::Checksum`]) and then
//!   stored with its value zeroed; [`encode_v2`] computes the checksum of the header it builds.
//!   Passing the old value on would make a backend that checks it reject the connection.
//!
//! # Limits
//!
//! - v1: [`V1_MAX_LEN`] = 107 bytes including the CRLF (the spec's worst case).
//! - v2: [`V2_MAX_LEN`] = 4096 bytes for the whole header, the 16 fixed bytes included. The spec
//!   itself allows 16 + 65535; real headers are a few hundred bytes even with TLS TLVs, and a cap
//!   lets the caller read into one fixed 4 KiB buffer. A larger declared length is
//!   [`Reason::TooLong`] as soon as the 16 fixed bytes are in.
//!
//! # Reading a header without reading past it
//!
//! [`parse`] looks at everything received so far and returns [`Parse::Incomplete`],
//! [`Parse::Done`] or [`Parse::Invalid`]. It never looks beyond the end of the header: the
//! result for `header ++ anything` is the result for `header` alone, and `Done { len }` is the
//! exact header length. Malformed input is rejected as soon as the bytes so far cannot start a
//! valid header (an HTTP request is rejected at its first byte), so a bad client is closed at
//! once rather than at the header timeout.
//!
//! Version 1 has no length prefix: its end is the CRLF. The caller must therefore use this
//! strategy, which works for both versions:
//!
//! 1. `recv(MSG_PEEK)` into a buffer of [`V2_MAX_LEN`] bytes (the kernel keeps the bytes);
//! 2. call [`parse`] on what was peeked;
//! 3. on `Done { len }`, consume exactly `len` bytes with a plain `recv` (or discard them): the
//!    stream bytes behind the header stay in the socket for the relay (and for `splice`);
//!    on `Incomplete`, wait for the socket to become readable again and peek again (new data
//!    makes a new edge-triggered event, so this suits mio); on `Invalid`, close.
//!
//! A caller that cannot peek may instead read exactly `need_at_least - have` more bytes each
//! time: `need_at_least` is a lower bound on the length of every valid header that starts with
//! the bytes so far, so such a reader never consumes a stream byte either. It is correct but
//! reads a v1 line two bytes at a time near its end; peeking is the intended use.
//!
//! # Addresses
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) in a received header are returned as IPv4:
//! they are IPv4 clients (a dual-stack proxy reports them that way), and per-IP policy, logs and
//! backends expect `a.b.c.d`. The encoders do the same: two IPv4 (or mapped) addresses are sent
//! as `TCP4` / `0x11`. A mixed pair (one IPv4, one IPv6) is sent as `TCP6` / `0x21` with the IPv4
//! one mapped, which keeps both addresses (`UNKNOWN` would lose the client). v1 IPv6 addresses
//! are written as hex groups only (`::ffff:c000:201`, never `::ffff:192.0.2.1`), the spec's
//! grammar.
//!
//! The data plane uses it for `--accept-proxy` (the session's `Header` phase, in
//! `session/mod.rs`), `--send-proxy` (the header written when a backend connect completes)
//! and `--health-send-proxy` (`health/probe.rs`); the fuzz target reaches it through
//! `holdfast::fuzzing`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest valid v1 header, CRLF included: `PROXY UNKNOWN` with two full IPv6 addresses and
/// ports (the spec's worst case).
pub const V1_MAX_LEN: usize = 107;

/// Shortest valid v1 header: `PROXY UNKNOWN\r\n`.
const V1_MIN_LEN: usize = 15;

const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Signature, version/command, family/transport and the `u16` length.
const V2_FIXED_LEN: usize = 16;

/// Longest v2 header holdfast accepts, the 16 fixed bytes included (see the module doc).
pub const V2_MAX_LEN: usize = 4096;

/// Most TLV bytes [`encode_v2`] can carry: the `u16` length covers the address block (36 bytes
/// at most for what holdfast sends) and the TLVs.
pub const MAX_TLVS_LEN: usize = u16::MAX as usize - 36;

/// `PP2_TYPE_CRC32C`: a CRC32c of the whole header, with this TLV's value zeroed.
const TLV_CRC32C: u8 = 0x03;

/// The v2 command (v1 headers are always [`Command::Proxy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// The sender opened the connection itself (a health check): use the connection's own
    /// addresses.
    Local,
    /// The connection is relayed on behalf of the client the header names.
    Proxy,
}

/// A well-formed sequence of v2 TLVs, kept as raw bytes.
///
/// Well formed means: every TLV complete (3-byte type and length, then that many bytes), at
/// most one `PP2_TYPE_CRC32C` and its value exactly 4 bytes, and at most [`MAX_TLVS_LEN`] bytes
/// in all. The type guarantees [`encode_v2`] can always send them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tlvs(Vec<u8>);

impl Tlvs {
    /// Checks `bytes` (see the type's doc) and wraps them. The value of a CRC32C TLV does not
    /// matter here: [`encode_v2`] computes it.
    pub fn new(bytes: Vec<u8>) -> Result<Tlvs, Reason> {
        if bytes.len() > MAX_TLVS_LEN {
            return Err(Reason::TooLong);
        }
        crc32c_offset(&bytes)?;
        Ok(Tlvs(bytes))
    }

    /// The raw TLV bytes, as they are sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No TLV at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each TLV's type and value, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &[u8])> {
        let mut rest = self.0.as_slice();
        std::iter::from_fn(move || {
            let (&kind, after) = rest.split_first()?;
            let (len, after) = after.split_first_chunk::<2>()?;
            let len = usize::from(u16::from_be_bytes(*len));
            let (value, after) = after.split_at_checked(len)?;
            rest = after;
            Some((kind, value))
        })
    }
}

/// What a received header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// `LOCAL` or `PROXY` (v1 is always `PROXY`).
    pub command: Command,
    /// `(source, destination)`: the client's address and the address it connected to. `None`
    /// means "use the connection's own addresses": `LOCAL`, v1 `UNKNOWN`, and v2 UNSPEC, UDP
    /// and UNIX families. IPv4-mapped IPv6 addresses are returned as IPv4.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// v2 TLVs after the address block, raw, to be passed on (empty for v1 and `LOCAL`). A
    /// CRC32C TLV, once verified, has its value zeroed.
    pub tlvs: Tlvs,
}

/// The result of [`parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    /// A valid header may still follow. Every valid header that starts with the bytes given is
    /// at least `need_at_least` bytes long, and `need_at_least` is greater than the number of
    /// bytes given.
    Incomplete { need_at_least: usize },
    /// A complete, valid header of exactly `len` bytes; whatever follows it is the stream.
    Done { header: ProxyHeader, len: usize },
    /// Not a valid header: close the connection and count the reason.
    Invalid(Reason),
}

/// Why a header was rejected; [`Reason::as_str`] is the `reason` label of
/// `holdfast_proxy_header_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Neither `PROXY ` nor the v2 signature.
    Signature,
    /// v2 version nibble other than 2.
    Version,
    /// v2 command other than `LOCAL` and `PROXY`.
    Command,
    /// v1 protocol other than `TCP4`, `TCP6`, `UNKNOWN`; v2 family/transport byte not one of
    /// the spec's seven.
    Family,
    /// v2 length shorter than the family's address block.
    Length,
    /// v1 line structure: spaces, field count, a lone CR or LF.
    Syntax,
    /// v1 address or port that is not a canonical number for its family.
    Address,
    /// v1 line longer than [`V1_MAX_LEN`], v2 header longer than [`V2_MAX_LEN`].
    TooLong,
    /// v2 TLVs that do not fill the declared length exactly, or a bad CRC32C TLV.
    Tlv,
    /// v2 CRC32C TLV that does not match the header.
    Checksum,
}

impl Reason {
    /// Every reason, for metrics that are exported at zero.
    pub const ALL: [Reason; 10] = [
        Reason::Signature,
        Reason::Version,
        Reason::Command,
        Reason::Family,
        Reason::Length,
        Reason::Syntax,
        Reason::Address,
        Reason::TooLong,
        Reason::Tlv,
        Reason::Checksum,
    ];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Signature => "signature",
            Reason::Version => "version",
            Reason::Command => "command",
            Reason::Family => "family",
            Reason::Length => "length",
            Reason::Syntax => "syntax",
            Reason::Address => "address",
            Reason::TooLong => "too_long",
            Reason::Tlv => "tlv",
            Reason::Checksum => "checksum",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses the start of a connection: everything received so far (see the module doc for how
/// to read without consuming stream bytes). Pure: the same bytes always give the same result.
pub fn parse(buf: &[u8]) -> Parse {
    match buf.first() {
        None => Parse::Incomplete {
            need_at_least: V1_MIN_LEN,
        },
        Some(&b) if b == V2_SIGNATURE[0] => parse_v2(buf),
        Some(&b) if b == V1_PREFIX[0] => parse_v1(buf),
        Some(_) => Parse::Invalid(Reason::Signature),
    }
}

fn parse_v2(buf: &[u8]) -> Parse {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Parse::Invalid(Reason::Signature);
    }
    // Reject what the bytes so far already rule out, before waiting for more.
    let command = match buf.get(12) {
        None => None,
        Some(&b) if b >> 4 != 2 => return Parse::Invalid(Reason::Version),
        Some(&b) => match b & 0x0f {
            0 => Some(Command::Local),
            1 => Some(Command::Proxy),
            _ => return Parse::Invalid(Reason::Command),
        },
    };
    let block = match (command, buf.get(13)) {
        (Some(Command::Proxy), Some(&family)) => match address_block_len(family) {
            Some(len) => len,
            None => return Parse::Invalid(Reason::Family),
        },
        _ => 0,
    };
    let Some(&[hi, lo]) = buf.get(14..16) else {
        return Parse::Incomplete {
            need_at_least: V2_FIXED_LEN,
        };
    };
    let len = V2_FIXED_LEN + usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX_LEN {
        return Parse::Invalid(Reason::TooLong);
    }
    if len < V2_FIXED_LEN + block {
        return Parse::Invalid(Reason::Length);
    }
    let Some(header) = buf.get(..len) else {
        return Parse::Incomplete { need_at_least: len };
    };
    if command == Some(Command::Local) {
        return Parse::Done {
            header: ProxyHeader {
                command: Command::Local,
                addresses: None,
                tlvs: Tlvs::default(),
            },
            len,
        };
    }
    let addrs = &header[V2_FIXED_LEN..V2_FIXED_LEN + block];
    let addresses = match header[13] {
        0x11 => Some(v4_pair(addrs)),
        0x21 => Some(v6_pair(addrs)),
        _ => None,
    };
    let tlvs = match received_tlvs(header, V2_FIXED_LEN + block) {
        Ok(tlvs) => tlvs,
        Err(reason) => return Parse::Invalid(reason),
    };
    Parse::Done {
        header: ProxyHeader {
            command: Command::Proxy,
            addresses,
            tlvs,
        },
        len,
    }
}

/// The address block length of a v2 family/transport byte under `PROXY`, or `None` for a byte
/// that is not one of the spec's seven.
fn address_block_len(family: u8) -> Option<usize> {
    match family {
        0x00 => Some(0),
        0x11 | 0x12 => Some(12),
        0x21 | 0x22 => Some(36),
        0x31 | 0x32 => Some(216),
        _ => None,
    }
}

/// A 12-byte IPv4 block: source, destination, source port, destination port.
fn v4_pair(b: &[u8]) -> (SocketAddr, SocketAddr) {
    let ip = |i: usize| Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]);
    let port = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    (
        SocketAddr::new(IpAddr::V4(ip(0)), port(8)),
        SocketAddr::new(IpAddr::V4(ip(4)), port(10)),
    )
}

/// A 36-byte IPv6 block, mapped addresses returned as IPv4.
fn v6_pair(b: &[u8]) -> (SocketAddr, SocketAddr) {
    let ip = |i: usize| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&b[i..i + 16]);
        IpAddr::V6(Ipv6Addr::from(octets)).to_canonical()
    };
    let port = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    (
        SocketAddr::new(ip(0), port(32)),
        SocketAddr::new(ip(16), port(34)),
    )
}

/// The TLVs of a complete received v2 header (`header[start..]`), checked, with a CRC32C TLV
/// verified and zeroed.
fn received_tlvs(header: &[u8], start: usize) -> Result<Tlvs, Reason> {
    let mut tlvs = header[start..].to_vec();
    if let Some(at) = crc32c_offset(&tlvs)? {
        let at = start + at;
        let claimed =
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let actual = crc32c(&[&header[..at], &[0; 4], &header[at + 4..]]);
        if claimed != actual {
            return Err(Reason::Checksum);
        }
        tlvs[at - start..at - start + 4].fill(0);
    }
    Ok(Tlvs(tlvs))
}

/// Checks that `tlvs` is a sequence of complete TLVs with at most one CRC32C TLV, of length
/// 4; returns the offset of that TLV's value.
fn crc32c_offset(tlvs: &[u8]) -> Result<Option<usize>, Reason> {
    let mut at = 0;
    let mut crc = None;
    while at < tlvs.len() {
        let Some(&[kind, hi, lo]) = tlvs.get(at..at + 3) else {
            return Err(Reason::Tlv);
        };
        let value = at + 3;
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if tlvs.len() - value < len {
            return Err(Reason::Tlv);
        }
        if kind == TLV_CRC32C {
            if len != 4 || crc.is_some() {
                return Err(Reason::Tlv);
            }
            crc = Some(value);
        }
        at = value + len;
    }
    Ok(crc)
}

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), the checksum RFC 4960 appendix B
/// describes and the PROXY spec names, over the concatenation of `parts`.
fn crc32c(parts: &[&[u8]]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for part in parts {
        for &b in *part {
            crc = TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
        }
    }
    !crc
}

fn parse_v1(buf: &[u8]) -> Parse {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Parse::Invalid(Reason::Signature);
    }
    // The CR must come early enough for the CRLF to end within V1_MAX_LEN bytes.
    let window = &buf[..buf.len().min(V1_MAX_LEN - 1)];
    match window.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(cr) if window[cr] == b'\r' => match buf.get(cr + 1) {
            Some(b'\n') => match parse_v1_line(&buf[..cr]) {
                Ok(header) => Parse::Done {
                    header,
                    len: cr + 2,
                },
                Err(reason) => Parse::Invalid(reason),
            },
            Some(_) => Parse::Invalid(Reason::Syntax),
            None => match check_v1_partial(&buf[..cr]) {
                Ok(()) => Parse::Incomplete {
                    need_at_least: (cr + 2).max(V1_MIN_LEN),
                },
                Err(reason) => Parse::Invalid(reason),
            },
        },
        // A lone LF.
        Some(_) => Parse::Invalid(Reason::Syntax),
        None if buf.len() + 2 > V1_MAX_LEN => Parse::Invalid(Reason::TooLong),
        None => match check_v1_partial(buf) {
            Ok(()) => Parse::Incomplete {
                need_at_least: (buf.len() + 2).max(V1_MIN_LEN),
            },
            Err(reason) => Parse::Invalid(reason),
        },
    }
}

/// Rejects the start of a v1 line (no CR or LF yet) that cannot become valid: a protocol that
/// is not a prefix of `TCP4`, `TCP6` or `UNKNOWN`, or a `TCP4`/`TCP6` line with a character
/// that cannot be part of an address or port.
fn check_v1_partial(line: &[u8]) -> Result<(), Reason> {
    let Some(rest) = line.get(V1_PREFIX.len()..) else {
        return Ok(());
    };
    const PROTOCOLS: [&[u8]; 3] = [b"TCP4", b"TCP6", b"UNKNOWN"];
    match rest.iter().position(|&b| b == b' ') {
        None if PROTOCOLS.iter().any(|p| p.starts_with(rest)) => Ok(()),
        None => Err(Reason::Family),
        Some(space) => match &rest[..space] {
            b"UNKNOWN" => Ok(()),
            b"TCP4" | b"TCP6" => {
                let fields = &rest[space + 1..];
                if fields
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b'.' || b == b':' || b == b' ')
                {
                    Ok(())
                } else {
                    Err(Reason::Address)
                }
            }
            _ => Err(Reason::Family),
        },
    }
}

/// A complete v1 line without its CRLF, known to start with `PROXY `.
fn parse_v1_line(line: &[u8]) -> Result<ProxyHeader, Reason> {
    let rest = &line[V1_PREFIX.len()..];
    let (protocol, fields) = match rest.iter().position(|&b| b == b' ') {
        Some(space) => (&rest[..space], Some(&rest[space + 1..])),
        None => (rest, None),
    };
    let v6 = match protocol {
        // Whatever follows UNKNOWN is ignored, as the spec says.
        b"UNKNOWN" => {
            return Ok(ProxyHeader {
                command: Command::Proxy,
                addresses: None,
                tlvs: Tlvs::default(),
            });
        }
        b"TCP4" => false,
        b"TCP6" => true,
        _ => return Err(Reason::Family),
    };
    let fields = fields.ok_or(Reason::Syntax)?;
    let mut fields = fields.split(|&b| b == b' ');
    let mut next = || match fields.next() {
        Some(field) if !field.is_empty() => Ok(field),
        _ => Err(Reason::Syntax),
    };
    let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
    if fields.next().is_some() {
        return Err(Reason::Syntax);
    }
    let (src, dst) = (v1_ip(src, v6)?, v1_ip(dst, v6)?);
    let (sport, dport) = (v1_port(sport)?, v1_port(dport)?);
    Ok(ProxyHeader {
        command: Command::Proxy,
        addresses: Some((SocketAddr::new(src, sport), SocketAddr::new(dst, dport))),
        tlvs: Tlvs::default(),
    })
}

/// An address of the line's family. std's parsers are strict enough: IPv4 without leading
/// zeros, IPv6 without zone or brackets (a dotted IPv4 tail is accepted, as `inet_pton` does).
fn v1_ip(field: &[u8], v6: bool) -> Result<IpAddr, Reason> {
    let text = std::str::from_utf8(field).map_err(|_| Reason::Address)?;
    if v6 {
        let ip: Ipv6Addr = text.parse().map_err(|_| Reason::Address)?;
        Ok(IpAddr::V6(ip).to_canonical())
    } else {
        let ip: Ipv4Addr = text.parse().map_err(|_| Reason::Address)?;
        Ok(IpAddr::V4(ip))
    }
}

/// A port: decimal digits only (no sign), no leading zero, at most 65535.
fn v1_port(field: &[u8]) -> Result<u16, Reason> {
    if field.len() > 5
        || !field.iter().all(u8::is_ascii_digit)
        || (field.len() > 1 && field[0] == b'0')
    {
        return Err(Reason::Address);
    }
    let value = field
        .iter()
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    u16::try_from(value).map_err(|_| Reason::Address)
}

/// The pair as it is sent: both IPv4 if both are IPv4 (or mapped), otherwise both IPv6 with
/// any IPv4 one mapped.
enum Pair {
    V4([Ipv4Addr; 2]),
    V6([Ipv6Addr; 2]),
}

fn pair(source: SocketAddr, destination: SocketAddr) -> Pair {
    match (source.ip().to_canonical(), destination.ip().to_canonical()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Pair::V4([s, d]),
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            Pair::V6([v6(s), v6(d)])
        }
    }
}

/// A v1 header for a connection from `source` to `destination` (see the module doc for
/// IPv4-mapped and mixed pairs). At most 104 bytes.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (sport, dport) = (source.port(), destination.port());
    let line = match pair(source, destination) {
        Pair::V4([s, d]) => format!("PROXY TCP4 {s} {d} {sport} {dport}\r\n"),
        Pair::V6([s, d]) => format!("PROXY TCP6 {} {} {sport} {dport}\r\n", HexV6(s), HexV6(d)),
    };
    line.into_bytes()
}

/// An IPv6 address as the v1 grammar wants it: hex groups, the longest run of two or more zero
/// groups (the first of equals) as `::`, lower case (RFC 5952), never a dotted IPv4 tail.
struct HexV6(Ipv6Addr);

impl fmt::Display for HexV6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups = self.0.segments();
        let (mut best, mut run) = ((0, 0), (0, 0));
        for (i, &g) in groups.iter().enumerate() {
            if g == 0 {
                run = if run.1 == 0 {
                    (i, 1)
                } else {
                    (run.0, run.1 + 1)
                };
                if run.1 > best.1 {
                    best = run;
                }
            } else {
                run = (0, 0);
            }
        }
        let write_groups = |f: &mut fmt::Formatter<'_>, groups: &[u16]| -> fmt::Result {
            for (i, g) in groups.iter().enumerate() {
                if i > 0 {
                    f.write_str(":")?;
                }
                write!(f, "{g:x}")?;
            }
            Ok(())
        };
        if best.1 < 2 {
            return write_groups(f, &groups);
        }
        write_groups(f, &groups[..best.0])?;
        f.write_str("::")?;
        write_groups(f, &groups[best.0 + best.1..])
    }
}

/// A v2 header. `Proxy` with addresses sends them (family `0x11` or `0x21`, see the module doc)
/// followed by `tlvs`; `Proxy` without addresses sends UNSPEC (`0x00`) and the TLVs. A CRC32C
/// TLV among `tlvs` gets the checksum of this header. `Local` sends [`encode_v2_local`]: the
/// spec says a `LOCAL` header should present no address, and receivers ignore its TLVs.
pub fn encode_v2(
    command: Command,
    addresses: Option<(SocketAddr, SocketAddr)>,
    tlvs: &Tlvs,
) -> Vec<u8> {
    if command == Command::Local {
        return encode_v2_local();
    }
    let mut out = Vec::with_capacity(V2_FIXED_LEN + 36 + tlvs.len());
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    let mut block = Vec::with_capacity(36);
    let family = match addresses.map(|(s, d)| (pair(s, d), s.port(), d.port())) {
        None => 0x00,
        Some((Pair::V4([s, d]), sport, dport)) => {
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
            block.extend_from_slice(&sport.to_be_bytes());
            block.extend_from_slice(&dport.to_be_bytes());
            0x11
        }
        Some((Pair::V6([s, d]), sport, dport)) => {
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
            block.extend_from_slice(&sport.to_be_bytes());
            block.extend_from_slice(&dport.to_be_bytes());
            0x21
        }
    };
    out.push(family);
    // At most 36 + MAX_TLVS_LEN = u16::MAX, which `Tlvs` guarantees.
    let len = u16::try_from(block.len() + tlvs.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&block);
    let start = out.len();
    out.extend_from_slice(tlvs.as_bytes());
    if let Ok(Some(at)) = crc32c_offset(tlvs.as_bytes()) {
        let at = start + at;
        out[at..at + 4].fill(0);
        let crc = crc32c(&[&out]);
        out[at..at + 4].copy_from_slice(&crc.to_be_bytes());
    }
    out
}

/// The 16-byte v2 `LOCAL` header with no address (family UNSPEC, length 0): what a health
/// check sends to a backend that requires a header (HAProxy's `check-send-proxy`).
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN);
    out.extend_from_slice(&V2_SIGNATURE);
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn done(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf) {
            Parse::Done { header, len } => (header, len),
            other => panic!("expected Done for {buf:?}, got {other:?}"),
        }
    }

    fn invalid(buf: &[u8]) -> Reason {
        match parse(buf) {
            Parse::Invalid(reason) => reason,
            other => panic!("expected Invalid for {buf:?}, got {other:?}"),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn proxy(src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader {
            command: Command::Proxy,
            addresses: Some((sa(src), sa(dst))),
            tlvs: Tlvs::default(),
        }
    }

    fn unknown() -> ProxyHeader {
        ProxyHeader {
            command: Command::Proxy,
            addresses: None,
            tlvs: Tlvs::default(),
        }
    }

    /// A v2 header from its parts, the length computed.
    fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn the_spec_v1_example_is_parsed_and_the_request_behind_it_is_left_alone() {
        let wire = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n\
                     Host: 192.168.0.11\r\n\r\n";
        let (header, len) = done(wire);
        assert_eq!(header, proxy("192.168.0.1:56324", "192.168.0.11:443"));
        assert_eq!(&wire[len..len + 5], b"GET /");
    }

    #[test]
    fn v1_tcp6_and_the_spec_longest_lines() {
        let (header, _) = done(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n");
        assert_eq!(header, proxy("[2001:db8::1]:1", "[2001:db8::2]:65535"));

        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6 = format!("PROXY TCP6 {f} {f} 65535 65535\r\n");
        assert_eq!(tcp6.len(), 104);
        assert_eq!(done(tcp6.as_bytes()).1, 104);

        let worst = format!("PROXY UNKNOWN {f} {f} 65535 65535\r\n");
        assert_eq!(worst.len(), V1_MAX_LEN);
        assert_eq!(done(worst.as_bytes()), (unknown(), V1_MAX_LEN));

        let longer = format!("PROXY UNKNOWN {f} {f} 65535 655350\r\n");
        assert_eq!(invalid(longer.as_bytes()), Reason::TooLong);
        // Rejected as soon as the 106th byte is in without a CR, not when the line ends.
        assert_eq!(invalid(&longer.as_bytes()[..106]), Reason::TooLong);
    }

    #[test]
    fn v1_unknown_with_or_without_addresses_means_the_connection_own() {
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (unknown(), 15));
        assert_eq!(
            done(b"PROXY UNKNOWN 1.2.3.4 whatever\r\nrest"),
            (unknown(), 32)
        );
    }

    #[test]
    fn v1_mapped_addresses_come_back_as_ipv4() {
        let (header, _) = done(b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:c000:202 1000 80\r\n");
        assert_eq!(header, proxy("192.0.2.1:1000", "192.0.2.2:80"));
    }

    #[test]
    fn v1_malformed_lines_are_rejected_with_their_reason() {
        let cases: &[(&[u8], Reason)] = &[
            (b"GET / HTTP/1.1\r\n", Reason::Signature),
            (b"PROXYTCP4", Reason::Signature),
            (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", Reason::Signature),
            (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", Reason::Family),
            (b"PROXY UNKNOWNX\r\n", Reason::Family),
            (b"PROXY \r\n", Reason::Family),
            (b"PROXY TCP4\r\n", Reason::Syntax),
            (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", Reason::Syntax),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", Reason::Syntax),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", Reason::Syntax),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", Reason::Syntax),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", Reason::Syntax),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX", Reason::Syntax),
            (b"PROXY UNKNOWN\n", Reason::Syntax),
            (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", Reason::Address),
            (b"PROXY TCP4 1.2.3.4 256.2.3.4 1 2\r\n", Reason::Address),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", Reason::Address),
            (b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n", Reason::Address),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", Reason::Address),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", Reason::Address),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 080 2\r\n", Reason::Address),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 +80 2\r\n", Reason::Address),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 8x 2\r\n", Reason::Address),
        ];
        for (wire, reason) in cases {
            assert_eq!(
                parse(wire),
                Parse::Invalid(*reason),
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
        assert_eq!(done(b"PROXY TCP4 0.0.0.0 1.2.3.4 0 0\r\n").1, 32);
    }

    #[test]
    fn garbage_is_rejected_before_the_line_ends() {
        assert_eq!(invalid(b"G"), Reason::Signature);
        assert_eq!(invalid(b"PROXY TCP9"), Reason::Family);
        assert_eq!(invalid(b"PROXY TCP4 1.2.3.4 x"), Reason::Address);
        assert_eq!(invalid(b"\r\n\r\n\0\r\nQUIX"), Reason::Signature);
        assert_eq!(
            parse(b"PROXY UNKNOWN \xff\xfe anything"),
            Parse::Incomplete { need_at_least: 27 }
        );
    }

    #[test]
    fn incomplete_says_how_much_at_least_is_needed() {
        assert_eq!(parse(b""), Parse::Incomplete { need_at_least: 15 });
        assert_eq!(parse(b"PRO"), Parse::Incomplete { need_at_least: 15 });
        assert_eq!(
            parse(b"PROXY UNKNOWN\r"),
            Parse::Incomplete { need_at_least: 15 }
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2"),
            Parse::Incomplete { need_at_least: 32 }
        );
        assert_eq!(parse(b"\r\n"), Parse::Incomplete { need_at_least: 16 });
        let header = encode_v2(
            Command::Proxy,
            Some((sa("1.2.3.4:5"), sa("6.7.8.9:10"))),
            &Tlvs::default(),
        );
        assert_eq!(
            parse(&header[..16]),
            Parse::Incomplete { need_at_least: 28 }
        );
    }

    #[test]
    fn v2_tcp4_and_tcp6_blocks() {
        let mut body = vec![172, 19, 0, 1, 172, 19, 0, 3];
        body.extend_from_slice(&42578u16.to_be_bytes());
        body.extend_from_slice(&80u16.to_be_bytes());
        let mut wire = v2(0x21, 0x11, &body);
        let header_len = wire.len();
        wire.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            done(&wire),
            (proxy("172.19.0.1:42578", "172.19.0.3:80"), 28)
        );
        assert_eq!(header_len, 28);

        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped().octets());
        body.extend_from_slice(&[0, 1, 0, 2]);
        assert_eq!(
            done(&v2(0x21, 0x21, &body)),
            (proxy("[2001:db8::1]:1", "192.0.2.9:2"), 52)
        );
    }

    #[test]
    fn v2_local_is_accepted_with_or_without_an_address_block() {
        let local = ProxyHeader {
            command: Command::Local,
            addresses: None,
            tlvs: Tlvs::default(),
        };
        assert_eq!(done(&encode_v2_local()), (local.clone(), 16));
        assert_eq!(
            encode_v2_local(),
            b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec()
        );
        // An address block and TLVs are skipped, and even the family is ignored.
        let mut body = vec![127, 0, 0, 1, 127, 0, 0, 2, 0, 1, 0, 2];
        body.extend(tlv(0x04, b"pad"));
        assert_eq!(done(&v2(0x20, 0x11, &body)), (local.clone(), 34));
        assert_eq!(done(&v2(0x20, 0xff, b"xyz")), (local, 19));
    }

    #[test]
    fn v2_families_without_usable_addresses_are_unknown_and_keep_their_tlvs() {
        let tlvs = tlv(0x02, b"example.com");
        for (family, block) in [(0x00, 0), (0x12, 12), (0x22, 36), (0x31, 216), (0x32, 216)] {
            let mut body = vec![7u8; block];
            body.extend_from_slice(&tlvs);
            let (header, len) = done(&v2(0x21, family, &body));
            assert_eq!(header.addresses, None, "family {family:#x}");
            assert_eq!(header.tlvs.as_bytes(), tlvs.as_slice());
            assert_eq!(len, 16 + block + tlvs.len());
        }
    }

    #[test]
    fn v2_malformed_headers_are_rejected_with_their_reason() {
        let block4 = [1u8, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2];
        assert_eq!(invalid(&v2(0x11, 0x11, &block4)), Reason::Version);
        assert_eq!(invalid(&v2(0x22, 0x11, &block4)), Reason::Command);
        assert_eq!(invalid(&v2(0x21, 0x13, &block4)), Reason::Family);
        assert_eq!(invalid(&v2(0x21, 0x41, &block4)), Reason::Family);
        assert_eq!(invalid(&v2(0x21, 0x10, &block4)), Reason::Family);
        assert_eq!(invalid(&v2(0x21, 0x11, &block4[..11])), Reason::Length);
        assert_eq!(invalid(&v2(0x21, 0x21, &block4)), Reason::Length);
        // Rejected from the fixed part alone, before the body arrives.
        assert_eq!(invalid(&v2(0x21, 0x21, &block4)[..16]), Reason::Length);
        assert_eq!(invalid(&v2(0x11, 0x11, &block4)[..13]), Reason::Version);

        let mut truncated = block4.to_vec();
        truncated.extend_from_slice(&tlv(0x01, b"h2")[..4]);
        assert_eq!(invalid(&v2(0x21, 0x11, &truncated)), Reason::Tlv);
        let mut stray = block4.to_vec();
        stray.extend_from_slice(&[0x04, 0x00]);
        assert_eq!(invalid(&v2(0x21, 0x11, &stray)), Reason::Tlv);
        let mut short_crc = block4.to_vec();
        short_crc.extend(tlv(TLV_CRC32C, b"abc"));
        assert_eq!(invalid(&v2(0x21, 0x11, &short_crc)), Reason::Tlv);
    }

    #[test]
    fn v2_length_is_capped() {
        let mut wire = V2_SIGNATURE.to_vec();
        wire.extend_from_slice(&[0x21, 0x11]);
        wire.extend_from_slice(&u16::try_from(V2_MAX_LEN - 16).unwrap().to_be_bytes());
        assert_eq!(
            parse(&wire),
            Parse::Incomplete {
                need_at_least: V2_MAX_LEN
            }
        );
        wire[15] += 1;
        assert_eq!(invalid(&wire), Reason::TooLong);
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(&[b"123456789"]), 0xe306_9283);
        assert_eq!(crc32c(&[b"1234", b"", b"56789"]), 0xe306_9283);
    }

    #[test]
    fn a_crc32c_tlv_is_verified_zeroed_and_recomputed_for_the_header_sent() {
        let src_dst = Some((sa("10.0.0.1:1234"), sa("10.0.0.2:443")));
        let mut raw = tlv(0x01, b"h2");
        raw.extend(tlv(TLV_CRC32C, &[0xaa; 4]));
        let tlvs = Tlvs::new(raw).unwrap();
        let wire = encode_v2(Command::Proxy, src_dst, &tlvs);
        let (header, _) = done(&wire);
        let zeroed = [tlv(0x01, b"h2"), tlv(TLV_CRC32C, &[0; 4])].concat();
        assert_eq!(header.tlvs.as_bytes(), zeroed.as_slice());
        assert_eq!(header.addresses, src_dst);

        // The checksum is over this header: one flipped port bit breaks it.
        let mut broken = wire.clone();
        broken[V2_FIXED_LEN + 9] ^= 1;
        assert_eq!(invalid(&broken), Reason::Checksum);

        // Passed on with other addresses, it is the checksum of the new header.
        let moved = encode_v2(
            Command::Proxy,
            Some((sa("[2001:db8::7]:1"), sa("[2001:db8::8]:2"))),
            &header.tlvs,
        );
        assert_ne!(moved[moved.len() - 4..], [0; 4]);
        assert_eq!(done(&moved).0.tlvs, header.tlvs);
    }

    #[test]
    fn tlvs_iterate_and_reject_malformed_input() {
        let raw = [tlv(0x01, b"h2"), tlv(0x04, b""), tlv(0xe0, b"x")].concat();
        let tlvs = Tlvs::new(raw).unwrap();
        let items: Vec<_> = tlvs.iter().collect();
        assert_eq!(
            items,
            vec![(0x01, &b"h2"[..]), (0x04, &b""[..]), (0xe0, &b"x"[..])]
        );
        assert_eq!(Tlvs::new(vec![1, 0]), Err(Reason::Tlv));
        assert_eq!(Tlvs::new(vec![1, 0, 2, 9]), Err(Reason::Tlv));
        let two_crcs = [tlv(TLV_CRC32C, &[0; 4]), tlv(TLV_CRC32C, &[0; 4])].concat();
        assert_eq!(Tlvs::new(two_crcs), Err(Reason::Tlv));
        assert_eq!(Tlvs::new(vec![0; MAX_TLVS_LEN + 1]), Err(Reason::TooLong));
    }

    #[test]
    fn encoders_follow_the_spec_for_mapped_and_mixed_pairs() {
        assert_eq!(
            encode_v1(sa("192.0.2.1:51234"), sa("198.51.100.7:443")),
            b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 443\r\n".to_vec()
        );
        // A dual-stack listener sees IPv4 clients as mapped addresses: still TCP4.
        assert_eq!(
            encode_v1(sa("[::ffff:192.0.2.1]:1"), sa("[::ffff:192.0.2.2]:2")),
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n".to_vec()
        );
        // Mixed: TCP6, the IPv4 side mapped, hex groups only.
        assert_eq!(
            encode_v1(sa("192.0.2.1:1"), sa("[2001:db8::1]:2")),
            b"PROXY TCP6 ::ffff:c000:201 2001:db8::1 1 2\r\n".to_vec()
        );
        assert_eq!(
            encode_v2(
                Command::Proxy,
                Some((sa("[::ffff:10.0.0.1]:1"), sa("10.0.0.2:2"))),
                &Tlvs::default()
            )[13],
            0x11
        );
        assert_eq!(
            encode_v2(
                Command::Local,
                Some((sa("10.0.0.1:1"), sa("10.0.0.2:2"))),
                &Tlvs::default()
            ),
            encode_v2_local()
        );
    }

    #[test]
    fn hex_v6_compresses_the_longest_zero_run() {
        let cases = [
            ("::", "::"),
            ("::1", "::1"),
            ("1::", "1::"),
            ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
            ("1:0:0:2:0:0:0:3", "1:0:0:2::3"),
            ("1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7"),
            (
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
        ];
        for (input, want) in cases {
            let ip: Ipv6Addr = input.parse().unwrap();
            assert_eq!(HexV6(ip).to_string(), want);
            assert_eq!(want.parse::<Ipv6Addr>().unwrap(), ip);
        }
    }

    #[test]
    fn reason_labels_are_distinct() {
        let labels: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
    }

    // ---- property tests ----

    fn ip_strategy() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
            any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
            any::<[u8; 4]>().prop_map(|o| IpAddr::V6(Ipv4Addr::from(o).to_ipv6_mapped())),
            // Zero runs, to exercise `::` compression.
            (any::<u16>(), 0usize..8, 0usize..8).prop_map(|(g, a, b)| {
                let mut s = [0u16; 8];
                s[a] = g;
                s[b] = g.rotate_left(3);
                IpAddr::V6(Ipv6Addr::from(s))
            }),
        ]
    }

    fn addr_strategy() -> impl Strategy<Value = SocketAddr> {
        (ip_strategy(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
    }

    /// Well-formed TLV bytes: a few TLVs of any type but CRC32C, maybe one CRC32C (with a
    /// random value, which the encoder replaces) somewhere among them.
    fn tlvs_strategy() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(
                (
                    any::<u8>().prop_filter("not crc", |&t| t != TLV_CRC32C),
                    proptest::collection::vec(any::<u8>(), 0..40),
                ),
                0..5,
            ),
            proptest::option::of((any::<[u8; 4]>(), any::<prop::sample::Index>())),
        )
            .prop_map(|(items, crc)| {
                let mut items: Vec<Vec<u8>> = items.iter().map(|(t, v)| tlv(*t, v)).collect();
                if let Some((value, at)) = crc {
                    let at = at.index(items.len() + 1);
                    items.insert(at, tlv(TLV_CRC32C, &value));
                }
                items.concat()
            })
    }

    /// The TLVs as a receiver stores them: the CRC32C value zeroed.
    fn zero_crc(mut tlvs: Vec<u8>) -> Vec<u8> {
        if let Ok(Some(at)) = crc32c_offset(&tlvs) {
            tlvs[at..at + 4].fill(0);
        }
        tlvs
    }

    fn canonical(a: SocketAddr) -> SocketAddr {
        SocketAddr::new(a.ip().to_canonical(), a.port())
    }

    /// Any valid header (v1 TCP, v1 UNKNOWN, v2 PROXY with or without addresses, v2 LOCAL),
    /// with what parsing it must give.
    fn header_strategy() -> impl Strategy<Value = (Vec<u8>, ProxyHeader)> {
        prop_oneof![
            (addr_strategy(), addr_strategy()).prop_map(|(s, d)| {
                (
                    encode_v1(s, d),
                    ProxyHeader {
                        command: Command::Proxy,
                        addresses: Some((canonical(s), canonical(d))),
                        tlvs: Tlvs::default(),
                    },
                )
            }),
            "[ -~]{0,40}".prop_map(|rest| {
                let line = if rest.is_empty() {
                    "PROXY UNKNOWN\r\n".to_string()
                } else {
                    format!("PROXY UNKNOWN {rest}\r\n")
                };
                (line.into_bytes(), unknown())
            }),
            (
                proptest::option::of((addr_strategy(), addr_strategy())),
                tlvs_strategy()
            )
                .prop_map(|(addrs, raw)| {
                    let tlvs = Tlvs::new(raw.clone()).unwrap();
                    (
                        encode_v2(Command::Proxy, addrs, &tlvs),
                        ProxyHeader {
                            command: Command::Proxy,
                            addresses: addrs.map(|(s, d)| (canonical(s), canonical(d))),
                            tlvs: Tlvs(zero_crc(raw)),
                        },
                    )
                }),
            Just((
                encode_v2_local(),
                ProxyHeader {
                    command: Command::Local,
                    addresses: None,
                    tlvs: Tlvs::default()
                }
            )),
        ]
    }

    /// The invariants every result must satisfy, whatever the input.
    fn check_invariants(buf: &[u8]) -> Result<(), TestCaseError> {
        match parse(buf) {
            Parse::Incomplete { need_at_least } => {
                prop_assert!(need_at_least > buf.len());
                prop_assert!(need_at_least <= V2_MAX_LEN);
            }
            Parse::Done { header, len } => {
                prop_assert!(len <= buf.len());
                // Nothing past the header was looked at.
                prop_assert_eq!(
                    parse(&buf[..len]),
                    Parse::Done {
                        header: header.clone(),
                        len
                    }
                );
                let v1 = buf[0] == b'P';
                let max = if v1 { V1_MAX_LEN } else { V2_MAX_LEN };
                prop_assert!(len <= max);
                // A v2 PROXY header re-encodes to one that parses the same.
                if !v1 && header.command == Command::Proxy {
                    let again = encode_v2(header.command, header.addresses, &header.tlvs);
                    prop_assert_eq!(
                        parse(&again),
                        Parse::Done {
                            header,
                            len: again.len()
                        }
                    );
                }
            }
            Parse::Invalid(_) => {}
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn v1_round_trips(s in addr_strategy(), d in addr_strategy()) {
            let wire = encode_v1(s, d);
            prop_assert!(wire.len() <= 104);
            prop_assert_eq!(
                parse(&wire),
                Parse::Done {
                    header: ProxyHeader {
                        command: Command::Proxy,
                        addresses: Some((canonical(s), canonical(d))),
                        tlvs: Tlvs::default(),
                    },
                    len: wire.len(),
                }
            );
        }

        #[test]
        fn v2_round_trips(
            addrs in proptest::option::of((addr_strategy(), addr_strategy())),
            raw in tlvs_strategy(),
        ) {
            let wire = encode_v2(Command::Proxy, addrs, &Tlvs::new(raw.clone()).unwrap());
            let (header, len) = done(&wire);
            prop_assert_eq!(len, wire.len());
            prop_assert_eq!(header.command, Command::Proxy);
            prop_assert_eq!(header.addresses, addrs.map(|(s, d)| (canonical(s), canonical(d))));
            let want = zero_crc(raw);
            prop_assert_eq!(header.tlvs.as_bytes(), want.as_slice());
        }

        /// A header split into up to three segments, followed by stream bytes, read as a
        /// non-blocking reader would: the same result once complete, `Incomplete` with a
        /// bound no larger than the header before.
        #[test]
        fn any_split_gives_the_same_result(
            (wire, want) in header_strategy(),
            stream in proptest::collection::vec(any::<u8>(), 0..64),
            cut1 in any::<prop::sample::Index>(),
            cut2 in any::<prop::sample::Index>(),
        ) {
            let all = [wire.as_slice(), &stream].concat();
            let (a, b) = {
                let (x, y) = (cut1.index(all.len() + 1), cut2.index(all.len() + 1));
                (x.min(y), x.max(y))
            };
            for have in [a, b, all.len()] {
                let got = parse(&all[..have]);
                if have < wire.len() {
                    match got {
                        Parse::Incomplete { need_at_least } => {
                            prop_assert!(need_at_least > have);
                            prop_assert!(need_at_least <= wire.len());
                        }
                        other => prop_assert!(false, "{have} bytes of {wire:?}: {other:?}"),
                    }
                } else {
                    prop_assert_eq!(got, Parse::Done { header: want.clone(), len: wire.len() });
                }
            }
        }

        /// A reader that reads exactly up to `need_at_least` each time (no peeking) ends
        /// exactly at the end of the header.
        #[test]
        fn reading_up_to_need_at_least_never_consumes_stream_bytes(
            (wire, want) in header_strategy(),
            stream in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let all = [wire.as_slice(), &stream].concat();
            let mut have = 0;
            loop {
                match parse(&all[..have]) {
                    Parse::Incomplete { need_at_least } => {
                        prop_assert!(need_at_least > have && need_at_least <= wire.len());
                        have = need_at_least;
                    }
                    Parse::Done { header, len } => {
                        prop_assert_eq!(header, want);
                        prop_assert_eq!(len, wire.len());
                        prop_assert_eq!(have, wire.len());
                        break;
                    }
                    Parse::Invalid(reason) => prop_assert!(false, "{reason} at {have}"),
                }
            }
        }

        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            check_invariants(&buf)?;
        }

        #[test]
        fn random_bytes_behind_a_signature_never_panic(
            v2 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let start: &[u8] = if v2 { &V2_SIGNATURE } else { b"PROXY " };
            check_invariants(&[start, &tail].concat())?;
        }

        #[test]
        fn mutated_headers_never_panic(
            (wire, _) in header_strategy(),
            edits in proptest::collection::vec(
                (any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
        ) {
            let mut buf = wire;
            for (at, byte, kind) in edits {
                let i = at.index(buf.len() + 1);
                match kind {
                    0 if i < buf.len() => buf[i] = byte,
                    1 => buf.insert(i, byte),
                    _ => buf.truncate(i),
                }
            }
            check_invariants(&buf)?;
        }

        #[test]
        fn v1_longer_than_107_bytes_is_too_long(
            body in proptest::collection::vec(
                any::<u8>().prop_filter("no CR or LF", |b| *b != b'\r' && *b != b'\n'),
                V1_MAX_LEN - 15..300),
        ) {
            let wire = [b"PROXY UNKNOWN ".as_slice(), &body, b"\r\n"].concat();
            prop_assert_eq!(parse(&wire), Parse::Invalid(Reason::TooLong));
        }

        #[test]
        fn v2_declared_longer_than_the_cap_is_too_long(
            declared in (V2_MAX_LEN - 16 + 1)..=usize::from(u16::MAX),
            command in 0u8..2,
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut wire = V2_SIGNATURE.to_vec();
            wire.extend_from_slice(&[0x20 | command, 0x11]);
            wire.extend_from_slice(&u16::try_from(declared).unwrap().to_be_bytes());
            wire.extend_from_slice(&rest);
            prop_assert_eq!(parse(&wire), Parse::Invalid(Reason::TooLong));
        }
    }
}
