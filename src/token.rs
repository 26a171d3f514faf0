//! Device tokens: parsing the forms producers send, and the compact list a
//! fan-out job keeps them in. A leaf: it knows nothing of jobs, protocols or
//! brokers, so every other module may use it.

use std::fmt;

/// A device token: 1 to 100 bytes inline. The binary interface takes exactly
/// 32 ([`DeviceToken::BINARY_LEN`]); Apple says tokens may grow, so HTTP/2
/// takes any length up to [`DeviceToken::MAX_LEN`]. Stored inline, so a token
/// is `Copy` and costs no allocation on either path; bytes past `len` are
/// always zero, which keeps the derived equality and hashing exact.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceToken {
    len: u8,
    bytes: [u8; DeviceToken::MAX_LEN],
}

impl DeviceToken {
    /// The only token length the binary interface knows.
    pub const BINARY_LEN: usize = 32;
    /// The longest token accepted (HTTP/2; Apple's documented upper bound).
    pub const MAX_LEN: usize = 100;

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut token = DeviceToken {
            len: 32,
            bytes: [0; Self::MAX_LEN],
        };
        token.bytes[..32].copy_from_slice(&bytes);
        token
    }

    /// A token of 1 to [`DeviceToken::MAX_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || bytes.len() > Self::MAX_LEN {
            return None;
        }
        let mut token = DeviceToken {
            len: bytes.len() as u8,
            bytes: [0; Self::MAX_LEN],
        };
        token.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(token)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Bytes in the token (never 0).
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false: a token has at least one byte. Here for the `len` convention.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Parses hex as producers send it: upper or lower case, with spaces, and
    /// wrapped in the `<...>` that iOS prints for `NSData`.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        if let Some(token) = Self::from_plain_hex(text.as_bytes()) {
            return Ok(token);
        }
        let trimmed = text.trim();
        let inner = trimmed
            .strip_prefix('<')
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or(trimmed);
        let mut out = [0u8; Self::MAX_LEN];
        let mut digits = 0usize;
        for c in inner.chars() {
            if c == ' ' {
                continue;
            }
            let v = c.to_digit(16).ok_or(TokenError::NotHex(c))? as u8;
            if digits < 2 * Self::MAX_LEN {
                out[digits / 2] |= if digits.is_multiple_of(2) { v << 4 } else { v };
            }
            digits += 1;
        }
        match digits {
            0 => Err(TokenError::Empty),
            n if !n.is_multiple_of(2) || n > 2 * Self::MAX_LEN => Err(TokenError::Length(n)),
            n => Ok(DeviceToken {
                len: (n / 2) as u8,
                bytes: out,
            }),
        }
    }

    /// The form producers almost always send, decoded without the general
    /// path's per-character work: a fan-out job parses thousands of these.
    fn from_plain_hex(text: &[u8]) -> Option<Self> {
        if text.is_empty() || !text.len().is_multiple_of(2) || text.len() > 2 * Self::MAX_LEN {
            return None;
        }
        let mut token = DeviceToken {
            len: (text.len() / 2) as u8,
            bytes: [0; Self::MAX_LEN],
        };
        // Table lookups with no branch per digit: a digit that is not hex
        // reads as 0xff, and one check at the end rejects the whole text.
        let mut bad = 0u8;
        for (byte, pair) in token.bytes.iter_mut().zip(text.chunks_exact(2)) {
            let (hi, lo) = (nibble(pair[0]), nibble(pair[1]));
            bad |= hi | lo;
            *byte = (hi << 4) | (lo & 0x0f);
        }
        (bad < 16).then_some(token)
    }

    /// The normalised form used in every result: lower-case hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

/// A job's device tokens, stored once for all its notifications: their bytes
/// back to back, so a fan-out job of 10,000 tokens costs 36 bytes a token
/// (not a [`DeviceToken`] of 101 each), and a notification names its token
/// by index.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Tokens {
    bytes: Vec<u8>,
    /// Where each token ends in `bytes`.
    ends: Vec<u32>,
}

impl Tokens {
    pub fn with_capacity(tokens: usize) -> Self {
        Tokens {
            bytes: Vec::with_capacity(tokens * DeviceToken::BINARY_LEN),
            ends: Vec::with_capacity(tokens),
        }
    }

    pub fn push(&mut self, token: &DeviceToken) {
        self.bytes.extend_from_slice(token.as_bytes());
        // At most u32::MAX / 100 tokens fit in a message RabbitMQ accepts.
        self.ends.push(self.bytes.len() as u32);
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The bytes of token `index`; empty past the end.
    pub fn bytes(&self, index: usize) -> &[u8] {
        let start = match index.checked_sub(1) {
            None => 0,
            Some(before) => self.ends.get(before).map_or(usize::MAX, |&e| e as usize),
        };
        let end = self.ends.get(index).map_or(0, |&e| e as usize);
        self.bytes.get(start..end).unwrap_or_default()
    }

    /// Token `index` as a value of its own (results, logs, retries).
    pub fn get(&self, index: usize) -> Option<DeviceToken> {
        DeviceToken::from_slice(self.bytes(index))
    }

    pub fn iter(&self) -> impl Iterator<Item = DeviceToken> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

impl FromIterator<DeviceToken> for Tokens {
    fn from_iter<I: IntoIterator<Item = DeviceToken>>(iter: I) -> Self {
        let mut tokens = Tokens::default();
        for t in iter {
            tokens.push(&t);
        }
        tokens
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// `c`'s value as a hex digit, 0xff if it is not one: for checks that OR
/// many digits together and test once.
pub fn nibble(c: u8) -> u8 {
    NIBBLE[usize::from(c)]
}

/// Each byte's value as a hex digit, 0xff for a byte that is not one.
const NIBBLE: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut c = 0;
    while c < 256 {
        if let Some(v) = hex_digit(c as u8) {
            table[c] = v;
        }
        c += 1;
    }
    table
};

const fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Hex(self.as_bytes()).fmt(f)
    }
}

/// Bytes as lower-case hex digits, written without allocating: a token in a
/// result or a log line, an `apns-id`.
pub struct Hex<'a>(pub &'a [u8]);

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// One byte's two lower-case hex digits.
pub fn hex_pair(b: u8) -> [u8; 2] {
    PAIRS[usize::from(b)]
}

/// Each byte's two digits: one lookup per byte for the path of every request.
const PAIRS: [[u8; 2]; 256] = {
    let mut table = [[0; 2]; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = [DIGITS[b >> 4], DIGITS[b & 0xf]];
        b += 1;
    }
    table
};

impl Hex<'_> {
    /// Appends the digits to `out` (a request's header block).
    pub fn append_to(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + 2 * self.0.len(), 0);
        for (pair, &b) in out[start..].chunks_exact_mut(2).zip(self.0) {
            pair.copy_from_slice(&hex_pair(b));
        }
    }
}

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        for chunk in self.0.chunks(buf.len() / 2) {
            for (pair, &b) in buf.chunks_exact_mut(2).zip(chunk) {
                pair.copy_from_slice(&hex_pair(b));
            }
            // Only ASCII digits were written, so this never fails.
            f.write_str(std::str::from_utf8(&buf[..2 * chunk.len()]).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceToken({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token has {0:?}, which is not a hex digit")]
    NotHex(char),
    #[error(
        "token has {0} hex digits; a token is an even number of them, at most 200 (100 bytes)"
    )]
    Length(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "1b14a89b65361301e7ded0f8de35ec1f322c37698b9fe712252a2cba42207d90";

    #[test]
    fn a_token_list_keeps_each_token_whole_whatever_its_length() {
        let tokens: Vec<DeviceToken> = [&[7u8; 32][..], &[9; 40], &[1; 1], &[2; 100]]
            .iter()
            .map(|b| DeviceToken::from_slice(b).unwrap())
            .collect();
        let list: Tokens = tokens.iter().copied().collect();
        assert_eq!(list.len(), 4);
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(list.bytes(i), t.as_bytes());
            assert_eq!(list.get(i), Some(*t));
        }
        assert_eq!(list.iter().collect::<Vec<_>>(), tokens);
        assert!(list.bytes(4).is_empty());
        assert_eq!(list.get(4), None);
        assert!(Tokens::default().bytes(0).is_empty());
    }

    #[test]
    fn token_normalisation_accepts_ios_forms() {
        let want = DeviceToken::parse(HEX).unwrap();
        assert_eq!(want.to_hex(), HEX);
        for form in [
            HEX.to_uppercase(),
            format!("<{}>", HEX),
            "<1b14a89b 65361301 e7ded0f8 de35ec1f 322c3769 8b9fe712 252a2cba 42207d90>".into(),
            format!("  {HEX} "),
        ] {
            assert_eq!(DeviceToken::parse(&form), Ok(want), "{form}");
        }
    }

    #[test]
    fn token_errors_say_what_is_wrong() {
        assert_eq!(DeviceToken::parse(""), Err(TokenError::Empty));
        assert_eq!(DeviceToken::parse("<>"), Err(TokenError::Empty));
        assert_eq!(DeviceToken::parse("abc"), Err(TokenError::Length(3)));
        assert_eq!(DeviceToken::parse(&HEX[..63]), Err(TokenError::Length(63)));
        assert_eq!(
            DeviceToken::parse(&HEX.replace('b', "g")),
            Err(TokenError::NotHex('g'))
        );
    }

    #[test]
    fn hex_of_any_length_is_lower_case_and_whole() {
        let bytes: Vec<u8> = (0..=99).collect();
        let want: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(Hex(&bytes).to_string(), want);
        assert_eq!(Hex(&[]).to_string(), "");
        assert_eq!(Hex(&[0xAB, 0x0f]).to_string(), "ab0f");
        let mut appended = b"x".to_vec();
        Hex(&bytes).append_to(&mut appended);
        assert_eq!(appended, format!("x{want}").as_bytes());
    }

    proptest::proptest! {
        #[test]
        fn plain_hex_decodes_exactly_the_texts_of_whole_hex_pairs(
            text in "[0-9a-fA-F]{0,204}|[0-9a-fA-F]{0,30}[g-z ][0-9a-fA-F]{0,33}"
        ) {
            let bytes = text.as_bytes();
            let whole = !bytes.is_empty()
                && bytes.len() % 2 == 0
                && bytes.len() <= 2 * DeviceToken::MAX_LEN
                && bytes.iter().all(u8::is_ascii_hexdigit);
            let want = whole.then(|| {
                (0..bytes.len() / 2)
                    .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
                    .collect::<Vec<u8>>()
            });
            let got = DeviceToken::from_plain_hex(bytes).map(|t| t.as_bytes().to_vec());
            proptest::prop_assert_eq!(got, want);
        }
    }
}
