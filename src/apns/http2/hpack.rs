//! HPACK (RFC 7541) as this client uses it. Requests are written as
//! literal fields that never enter the dynamic table and are never Huffman
//! coded: a header block is then a string of copies with no encoder state to
//! keep in step with the server's, so a block costs a few memcpys and what an
//! app sends on every request can be prepared once. Answers are decoded in
//! full (the server may index and Huffman-code freely) by `loona-hpack`,
//! whose table must see every block the connection receives.

use std::borrow::Cow;

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
#[derive(Debug, thiserror::Error)]
#[error("cannot decode the server's header block: {0:?}")]
pub struct DecodeError(loona_hpack::decoder::DecoderError);

/// One connection's decoding context for the blocks it receives.
pub struct Decoder(loona_hpack::Decoder<'static>);

impl Default for Decoder {
    fn default() -> Self {
        Decoder(loona_hpack::Decoder::new())
    }
}

impl Decoder {
    /// Decodes a whole header block, handing every field to `field`.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        self.0
            .decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| {
                field(&name, &value)
            })
            .map_err(DecodeError)
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
        assert!(d
            .decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], |_, _| {})
            .is_err());
    }
}
