//! HPACK (RFC 7541) as this client uses it. Requests are written as
//! literal fields that never enter the dynamic table and are never Huffman
//! coded: a header block is then a string of copies with no encoder state to
//! keep in step with the server's, so a block costs a few memcpys and what an
//! app sends on every request can be prepared once. Answers are decoded in
//! full, as the server may index and Huffman-code freely: APNs answers every
//! request with a fresh `apns-id`, so decoding is on the hot path and is done
//! here without a tree walk or an allocation per field.

use std::collections::VecDeque;

/// Indices of the static table (RFC 7541 Appendix A) this client writes.
pub mod index {
    pub const AUTHORITY: usize = 1;
    pub const METHOD: usize = 2;
    pub const METHOD_POST: usize = 3;
    pub const PATH: usize = 4;
    pub const SCHEME_HTTPS: usize = 7;
    pub const AUTHORIZATION: usize = 23;
}

/// Appends `value` as an HPACK integer with an `prefix`-bit prefix, the
/// bits above the prefix in the first byte set to `flags` (RFC 7541 §5.1).
pub fn integer(out: &mut Vec<u8>, prefix: u8, flags: u8, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A string literal, not Huffman coded (§5.2).
pub fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 7, 0, s.len());
    out.extend_from_slice(s);
}

/// The dynamic table's size set to 0 (§6.3): the first thing on a
/// connection, so the server keeps nothing for this client, whatever
/// SETTINGS_HEADER_TABLE_SIZE it announces.
pub fn no_table(out: &mut Vec<u8>) {
    integer(out, 5, 0x20, 0);
}

/// A field of the static table, name and value (§6.1).
pub fn indexed(out: &mut Vec<u8>, index: usize) {
    integer(out, 7, 0x80, index);
}

/// A literal value for a static table name, not indexed (§6.2.2).
pub fn field(out: &mut Vec<u8>, name: usize, value: &[u8]) {
    integer(out, 4, 0, name);
    string(out, value);
}

/// A literal value for a static table name that intermediaries must never
/// index either (§6.2.3): the provider token.
pub fn sensitive(out: &mut Vec<u8>, name: usize, value: &[u8]) {
    integer(out, 4, 0x10, name);
    string(out, value);
}

/// A literal field with a literal (lower-case) name, not indexed (§6.2.2).
pub fn named(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    string(out, name);
    string(out, value);
}

/// An answer's header block that does not decode: the connection is done
/// (RFC 9113 §4.3, COMPRESSION_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode the server's header block: {0}")]
pub struct DecodeError(&'static str);

/// The size of the dynamic table this end allows (SETTINGS_HEADER_TABLE_SIZE,
/// left at its default).
pub const TABLE_SIZE: usize = 4096;

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// One connection's decoding context for the header blocks it receives
/// (RFC 7541 §2.3, §3, §6). Every block the connection gets must go through
/// it, in order, so its dynamic table stays the server's.
pub struct Decoder {
    table: Table,
    allowed: usize,
    /// Reused for literal names and values, Huffman-decoded or copied.
    name: Vec<u8>,
    value: Vec<u8>,
}

/// The dynamic table (§2.3.2, §4): newest first, index 62 is `entries[0]`.
struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::with_limit(TABLE_SIZE)
    }
}

impl Decoder {
    /// A decoder whose table may grow to `allowed` bytes.
    pub fn with_limit(allowed: usize) -> Self {
        Decoder {
            table: Table {
                entries: VecDeque::new(),
                size: 0,
                max: allowed,
            },
            allowed,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// Decodes a whole header block, handing every field to `field`.
    pub fn decode(
        &mut self,
        mut block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        let mut first = true;
        while let Some(&byte) = block.first() {
            if byte & 0x80 != 0 {
                let (index, rest) = read_integer(block, 7)?;
                block = rest;
                let (name, value) = self.table.entry(index)?;
                field(name, value);
            } else if byte & 0xe0 == 0x20 {
                // A size update belongs at the start of a block (§4.2).
                if !first {
                    return Err(DecodeError("table size update after a field"));
                }
                let (size, rest) = read_integer(block, 5)?;
                block = rest;
                if size > self.allowed {
                    return Err(DecodeError("table size above the allowed size"));
                }
                self.table.max = size;
                self.table.evict(0);
                continue;
            } else {
                let (indexing, prefix) = if byte & 0x40 != 0 {
                    (true, 6)
                } else {
                    (false, 4)
                };
                let (index, rest) = read_integer(block, prefix)?;
                block = rest;
                let (name, value) = (&mut self.name, &mut self.value);
                name.clear();
                value.clear();
                if index == 0 {
                    block = read_string(block, name)?;
                } else {
                    name.extend_from_slice(self.table.entry(index)?.0);
                }
                block = read_string(block, value)?;
                field(name, value);
                if indexing {
                    self.table.insert(name, value);
                }
            }
            first = false;
        }
        Ok(())
    }
}

impl Table {
    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        match index {
            0 => Err(DecodeError("index 0")),
            1..=61 => {
                let (name, value) = STATIC[index - 1];
                Ok((name.as_bytes(), value.as_bytes()))
            }
            _ => self
                .entries
                .get(index - 62)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or(DecodeError("index beyond the table")),
        }
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + 32;
        // An entry larger than the table empties it and is not added (§4.4).
        self.evict(size);
        if size <= self.max {
            self.entries.push_front((name.into(), value.into()));
            self.size += size;
        }
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((n, v)) = self.entries.pop_back() else {
                self.size = 0;
                return;
            };
            self.size -= n.len() + v.len() + 32;
        }
    }
}

/// Reads an integer with a `prefix`-bit prefix (§5.1).
fn read_integer(block: &[u8], prefix: u8) -> Result<(usize, &[u8]), DecodeError> {
    let max = (1usize << prefix) - 1;
    let (&first, mut rest) = block
        .split_first()
        .ok_or(DecodeError("truncated integer"))?;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok((value, rest));
    }
    let mut shift = 0;
    loop {
        let (&b, next) = rest.split_first().ok_or(DecodeError("truncated integer"))?;
        rest = next;
        if shift > 28 {
            return Err(DecodeError("integer too large"));
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok((value, rest));
        }
    }
}

/// Reads a string literal (§5.2) into `out`, Huffman-decoding it if coded.
fn read_string<'a>(block: &'a [u8], out: &mut Vec<u8>) -> Result<&'a [u8], DecodeError> {
    let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
    let (len, rest) = read_integer(block, 7)?;
    if len > rest.len() {
        return Err(DecodeError("truncated string"));
    }
    let (bytes, rest) = rest.split_at(len);
    if huffman {
        huffman::decode(bytes, out)?;
    } else {
        out.extend_from_slice(bytes);
    }
    Ok(rest)
}

/// The static table (RFC 7541 Appendix A).
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The Huffman code of RFC 7541 Appendix B. It is canonical (codes of one
/// length are consecutive, in symbol order, and shorter codes come first), so
/// the code lengths alone define it, and decoding compares the next 32 bits,
/// left-justified, with one bound per length instead of walking a tree.
mod huffman {
    use super::DecodeError;

    /// Code lengths of symbols 0..=255 and EOS (256).
    const LENGTHS: [u8; 257] = [
        13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30,
        28, 28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
        5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
        7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5,
        7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22,
        22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23,
        22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22,
        21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26,
        26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20,
        24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27,
        27, 28, 27, 27, 27, 27, 27, 26, 30,
    ];
    const EOS: u16 = 256;
    const MAX_LEN: usize = 30;

    /// Per length: the first code, the exclusive bound of all codes up to this
    /// length (left-justified to 32 bits), and where its symbols start.
    struct Tables {
        first: [u32; MAX_LEN + 1],
        limit: [u64; MAX_LEN + 1],
        offset: [u16; MAX_LEN + 1],
        symbols: [u16; 257],
    }

    const TABLES: Tables = build();

    const fn build() -> Tables {
        let mut count = [0u16; MAX_LEN + 1];
        let mut s = 0;
        while s < 257 {
            count[LENGTHS[s] as usize] += 1;
            s += 1;
        }
        let mut t = Tables {
            first: [0; MAX_LEN + 1],
            limit: [0; MAX_LEN + 1],
            offset: [0; MAX_LEN + 1],
            symbols: [0; 257],
        };
        let mut code = 0u32;
        let mut offset = 0u16;
        let mut len = 1;
        while len <= MAX_LEN {
            t.first[len] = code;
            t.offset[len] = offset;
            code += count[len] as u32;
            offset += count[len];
            t.limit[len] = (code as u64) << (32 - len);
            code <<= 1;
            len += 1;
        }
        let mut next = t.offset;
        let mut len = 1;
        while len <= MAX_LEN {
            let mut s = 0;
            while s < 257 {
                if LENGTHS[s] as usize == len {
                    t.symbols[next[len] as usize] = s as u16;
                    next[len] += 1;
                }
                s += 1;
            }
            len += 1;
        }
        t
    }

    /// Decodes `bytes` onto `out` (§5.2: padding is at most 7 bits of the
    /// EOS code's leading ones; EOS itself is an error).
    pub fn decode(bytes: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let t = &TABLES;
        let mut acc = 0u64;
        let mut bits = 0u32;
        let mut input = bytes.iter();
        loop {
            while bits <= 56 {
                match input.next() {
                    Some(&b) => {
                        acc = (acc << 8) | u64::from(b);
                        bits += 8;
                    }
                    None => break,
                }
            }
            if bits == 0 {
                return Ok(());
            }
            // The next 32 bits, left-justified, zeros past the end.
            let window = if bits >= 32 {
                (acc >> (bits - 32)) & 0xffff_ffff
            } else {
                (acc << (32 - bits)) & 0xffff_ffff
            };
            let mut len = 5;
            while len <= MAX_LEN && window >= t.limit[len] {
                len += 1;
            }
            if len > MAX_LEN || len as u32 > bits {
                // Only padding may be left: fewer than 8 bits, all ones.
                return if bits < 8 && acc == (1u64 << bits) - 1 {
                    Ok(())
                } else {
                    Err(DecodeError("bad Huffman padding"))
                };
            }
            let code = (window >> (32 - len)) as u32;
            let symbol = t.symbols[(t.offset[len] as u32 + code - t.first[len]) as usize];
            if symbol == EOS {
                return Err(DecodeError("EOS in a Huffman string"));
            }
            out.push(symbol as u8);
            bits -= len as u32;
            acc &= (1u64 << bits) - 1;
        }
    }

    #[cfg(test)]
    pub mod tests {
        use super::*;

        /// Encodes `text` with the same code, for round trips.
        pub fn encode(text: &[u8]) -> Vec<u8> {
            let t = &TABLES;
            let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
            for &b in text {
                let len = LENGTHS[b as usize] as usize;
                let rank = t.symbols[t.offset[len] as usize..]
                    .iter()
                    .position(|&s| s == u16::from(b))
                    .unwrap();
                acc = (acc << len) | u64::from(t.first[len] + rank as u32);
                bits += len as u32;
                while bits >= 8 {
                    out.push((acc >> (bits - 8)) as u8);
                    bits -= 8;
                }
            }
            if bits > 0 {
                out.push(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) as u8);
            }
            out
        }

        #[test]
        fn rfc_7541_c_4_strings_decode() {
            for (coded, text) in [
                (
                    &[
                        0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
                    ][..],
                    "www.example.com",
                ),
                (&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf], "no-cache"),
                (
                    &[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f],
                    "custom-key",
                ),
                (
                    &[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf],
                    "custom-value",
                ),
            ] {
                let mut out = Vec::new();
                decode(coded, &mut out).unwrap();
                assert_eq!(out, text.as_bytes());
                assert_eq!(encode(text.as_bytes()), coded);
            }
        }

        #[test]
        fn bad_padding_and_eos_are_errors() {
            let mut out = Vec::new();
            // 'a' (00011, 5 bits) padded with zeros instead of ones.
            assert!(decode(&[0b0001_1000], &mut out).is_err());
            // A whole byte of padding.
            assert!(decode(&[0b0001_1111, 0xff], &mut out).is_err());
            // EOS: thirty ones.
            assert!(decode(&[0xff, 0xff, 0xff, 0xff], &mut out).is_err());
        }

        proptest::proptest! {
            #[test]
            fn every_byte_string_round_trips(text: Vec<u8>) {
                let mut out = Vec::new();
                decode(&encode(&text), &mut out).unwrap();
                proptest::prop_assert_eq!(out, text);
            }

            #[test]
            fn any_bytes_decode_without_panicking(bytes: Vec<u8>) {
                let _ = decode(&bytes, &mut Vec::new());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8]) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        Decoder::default()
            .decode(block, |n, v| {
                fields.push((
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                ))
            })
            .unwrap();
        fields
    }

    #[test]
    fn written_blocks_decode_as_written() {
        let mut b = Vec::new();
        no_table(&mut b);
        indexed(&mut b, index::METHOD_POST);
        indexed(&mut b, index::SCHEME_HTTPS);
        field(&mut b, index::PATH, b"/3/device/ab");
        field(&mut b, index::AUTHORITY, b"api.push.apple.com");
        named(&mut b, b"apns-topic", &[b'x'; 300]);
        sensitive(&mut b, index::AUTHORIZATION, b"bearer a.b.c");
        let fields = decode(&b);
        let want = [
            (":method", "POST".to_owned()),
            (":scheme", "https".to_owned()),
            (":path", "/3/device/ab".to_owned()),
            (":authority", "api.push.apple.com".to_owned()),
            ("apns-topic", "x".repeat(300)),
            ("authorization", "bearer a.b.c".to_owned()),
        ];
        let want: Vec<(String, String)> =
            want.into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
        assert_eq!(fields, want);
    }

    #[test]
    fn the_dynamic_table_evicts_oldest_first_and_obeys_size_updates() {
        // Literal with incremental indexing, new name: 0x40, name, value.
        let insert = |b: &mut Vec<u8>, name: &[u8], value: &[u8]| {
            b.push(0x40);
            string(b, name);
            string(b, value);
        };
        let mut d = Decoder::with_limit(100);
        let mut b = Vec::new();
        insert(&mut b, b"a", b"1"); // 34 bytes
        insert(&mut b, b"b", b"2");
        insert(&mut b, b"c", b"3"); // 102 > 100: "a" goes
        indexed(&mut b, 62);
        indexed(&mut b, 63);
        let mut seen = Vec::new();
        d.decode(&b, |n, v| seen.push([n.to_vec(), v.to_vec()].concat()))
            .unwrap();
        assert_eq!(seen[3..], [b"c3".to_vec(), b"b2".to_vec()]);
        assert!(d.decode(&[0x80 | 64], |_, _| {}).is_err(), "a was evicted");

        // A size update to 40 keeps only the newest; above the limit it is refused.
        d.decode(&[0x20 | 31, 40 - 31], |_, _| {}).unwrap();
        let mut seen = Vec::new();
        d.decode(&[0x80 | 62], |n, v| seen.push([n, v].concat()))
            .unwrap();
        assert_eq!(seen, [b"c3".to_vec()]);
        assert!(d.decode(&[0x80 | 63], |_, _| {}).is_err());
        assert!(
            d.decode(&[0x3f, 0xff, 0x01], |_, _| {}).is_err(),
            "above 100"
        );
        assert!(
            d.decode(&[0x80 | 62, 0x20], |_, _| {}).is_err(),
            "an update after a field"
        );
        assert!(d.decode(&[0x80], |_, _| {}).is_err(), "index 0");
    }

    proptest::proptest! {
        #[test]
        fn any_block_decodes_without_panicking(block: Vec<u8>) {
            let _ = Decoder::default().decode(&block, |_, _| {});
        }
    }

    #[test]
    fn integers_follow_rfc_7541_c_1() {
        let mut b = Vec::new();
        integer(&mut b, 5, 0, 10);
        assert_eq!(b, [10]);
        b.clear();
        integer(&mut b, 5, 0, 1337);
        assert_eq!(b, [31, 154, 10]);
        b.clear();
        integer(&mut b, 8, 0, 42);
        assert_eq!(b, [42]);
        b.clear();
        integer(&mut b, 4, 0x10, 23);
        assert_eq!(b, [0x1f, 8]);
    }

    #[test]
    fn a_block_from_a_server_that_indexes_and_huffman_codes_decodes() {
        // RFC 7541 C.6.1 and C.6.2: responses with Huffman coding, the second
        // referring to the first's dynamic table entries.
        let first = [
            0x48, 0x82, 0x64, 0x02, 0x58, 0x85, 0xae, 0xc3, 0x77, 0x1a, 0x4b, 0x61, 0x96, 0xd0,
            0x7a, 0xbe, 0x94, 0x10, 0x54, 0xd4, 0x44, 0xa8, 0x20, 0x05, 0x95, 0x04, 0x0b, 0x81,
            0x66, 0xe0, 0x82, 0xa6, 0x2d, 0x1b, 0xff, 0x6e, 0x91, 0x9d, 0x29, 0xad, 0x17, 0x18,
            0x63, 0xc7, 0x8f, 0x0b, 0x97, 0xc8, 0xe9, 0xae, 0x82, 0xae, 0x43, 0xd3,
        ];
        let second = [0x48, 0x83, 0x64, 0x0e, 0xff, 0xc1, 0xc0, 0xbf];
        let mut d = Decoder::default();
        let mut statuses = Vec::new();
        for block in [&first[..], &second[..]] {
            d.decode(block, |n, v| {
                if n == b":status" {
                    statuses.push(String::from_utf8_lossy(v).into_owned());
                }
            })
            .unwrap();
        }
        assert_eq!(statuses, ["302", "307"]);
        // C.6.2 in full, with the example's 256-byte table.
        let mut d = Decoder::with_limit(256);
        d.decode(&first, |_, _| {}).unwrap();
        let mut fields = Vec::new();
        d.decode(&second, |n, v| fields.push((n.to_vec(), v.to_vec())))
            .unwrap();
        let want: [(&[u8], &[u8]); 4] = [
            (b":status", b"307"),
            (b"cache-control", b"private"),
            (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
            (b"location", b"https://www.example.com"),
        ];
        assert_eq!(fields, want.map(|(n, v)| (n.to_vec(), v.to_vec())));
        assert!(d
            .decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], |_, _| {})
            .is_err());
    }
}
