//! A request's header fields as the simulator reads them: only the fields
//! Apple's rules look at, their values in one buffer that a stream hands on
//! to the next, so a request costs no allocation once a connection is warm
//! (a `HeaderMap` cost several per request, for fields never read).

use http::{HeaderMap, HeaderName, HeaderValue};

/// The fields kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    Method,
    Path,
    Topic,
    PushType,
    Priority,
    Expiration,
    Id,
    CollapseId,
    Authorization,
    ChannelId,
    ContentLength,
}

const FIELDS: usize = 11;

/// The regular fields, by name, for [`Head::header_map`].
const NAMED: [(Field, &str); 9] = [
    (Field::Topic, "apns-topic"),
    (Field::PushType, "apns-push-type"),
    (Field::Priority, "apns-priority"),
    (Field::Expiration, "apns-expiration"),
    (Field::Id, "apns-id"),
    (Field::CollapseId, "apns-collapse-id"),
    (Field::Authorization, "authorization"),
    (Field::ChannelId, "apns-channel-id"),
    (Field::ContentLength, "content-length"),
];

impl Field {
    fn of(name: &[u8]) -> Option<Field> {
        Some(match name {
            b":method" => Field::Method,
            b":path" => Field::Path,
            b"apns-topic" => Field::Topic,
            b"apns-push-type" => Field::PushType,
            b"apns-priority" => Field::Priority,
            b"apns-expiration" => Field::Expiration,
            b"apns-id" => Field::Id,
            b"apns-collapse-id" => Field::CollapseId,
            b"authorization" => Field::Authorization,
            b"apns-channel-id" => Field::ChannelId,
            b"content-length" => Field::ContentLength,
            _ => return None,
        })
    }
}

/// One request's fields.
#[derive(Debug, Default)]
pub(super) struct Head {
    /// Values that are text, checked once as they arrive.
    text: String,
    /// Values that are not (read only by what echoes or forwards them).
    other: Vec<u8>,
    spans: [Option<Span>; FIELDS],
}

/// Where a value is: `text` or `other`, from `start` to `end`.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
    text: bool,
}

impl Head {
    /// Empties it for the next stream, keeping the buffers.
    pub(super) fn clear(&mut self) {
        self.text.clear();
        self.other.clear();
        self.spans = [None; FIELDS];
    }

    /// Keeps `value` if `name` is a field read here; of a repeated field the
    /// first counts, as with `HeaderMap::get`.
    pub(super) fn set(&mut self, name: &[u8], value: &[u8]) {
        let Some(field) = Field::of(name) else {
            return;
        };
        let span = &mut self.spans[field as usize];
        if span.is_some() {
            return;
        }
        // Only the path is read of `:path`, as `Uri::path` gives it: cut at
        // the query once here, not at each of a request's reads.
        let value = match field {
            Field::Path => value.split(|&b| b == b'?').next().unwrap_or(value),
            _ => value,
        };
        // Header blocks are bounded far below 4 GiB.
        *span = Some(match as_text(value) {
            Some(text) => {
                let start = self.text.len() as u32;
                self.text.push_str(text);
                Span {
                    start,
                    end: self.text.len() as u32,
                    text: true,
                }
            }
            None => {
                let start = self.other.len() as u32;
                self.other.extend_from_slice(value);
                Span {
                    start,
                    end: self.other.len() as u32,
                    text: false,
                }
            }
        });
    }

    /// A field's value as it came.
    pub(super) fn bytes(&self, field: Field) -> Option<&[u8]> {
        let span = self.spans[field as usize]?;
        let range = span.start as usize..span.end as usize;
        if span.text {
            self.text.as_bytes().get(range)
        } else {
            self.other.get(range)
        }
    }

    /// A field's value if present and text as `HeaderValue::to_str` takes it
    /// (visible ASCII, spaces and tabs).
    pub(super) fn get(&self, field: Field) -> Option<&str> {
        let span = self.spans[field as usize].filter(|s| s.text)?;
        self.text.get(span.start as usize..span.end as usize)
    }

    /// The path without its query, as `Uri::path` gives it.
    pub(super) fn path(&self) -> Option<&str> {
        self.get(Field::Path)
    }

    /// The declared body length: `Ok(None)` without one, `Err` if it is not a
    /// number (the request is malformed).
    pub(super) fn content_length(&self) -> Result<Option<u64>, ()> {
        match self.bytes(Field::ContentLength) {
            None => Ok(None),
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or(()),
        }
    }

    /// Whether the pseudo-header fields every request needs are there.
    pub(super) fn well_formed(&self) -> bool {
        self.get(Field::Method).is_some_and(|m| !m.is_empty())
            && self.path().is_some_and(|p| p.starts_with('/'))
            && self.content_length().is_ok()
    }

    /// The fields as a `HeaderMap`, for the channel management paths (rare
    /// enough to afford one).
    pub(super) fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (field, name) in NAMED {
            if let Some(value) = self.bytes(field) {
                if let Ok(value) = HeaderValue::from_bytes(value) {
                    map.insert(HeaderName::from_static(name), value);
                }
            }
        }
        map
    }
}

/// `value` as text if `HeaderValue::to_str` would take it.
fn as_text(value: &[u8]) -> Option<&str> {
    // Without an early exit the check runs many bytes at a time.
    let visible = value.iter().fold(true, |ok, &b| {
        ok & ((b' '..0x7f).contains(&b) | (b == b'\t'))
    });
    if visible {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_are_kept_the_first_of_each_and_the_rest_ignored() {
        let mut head = Head::default();
        head.set(b":method", b"POST");
        head.set(b":path", b"/3/device/ab?x=1");
        head.set(b"apns-topic", b"com.example");
        head.set(b"apns-topic", b"com.other");
        head.set(b"user-agent", b"test");
        head.set(b"apns-id", b"caf\xc3\xa9");
        head.set(b"apns-collapse-id", b"x");
        assert_eq!(head.get(Field::Method), Some("POST"));
        assert_eq!(head.path(), Some("/3/device/ab"));
        assert_eq!(head.get(Field::Topic), Some("com.example"));
        assert_eq!(head.get(Field::Id), None, "not visible ASCII");
        assert_eq!(head.bytes(Field::Id), Some("café".as_bytes()));
        assert_eq!(head.get(Field::CollapseId), Some("x"));
        assert!(head.well_formed());
        let map = head.header_map();
        assert_eq!(map.get("apns-topic").unwrap(), "com.example");
        assert_eq!(map.len(), 3);
        head.clear();
        assert_eq!(head.get(Field::Topic), None);
        assert!(!head.well_formed());
        head.set(b":method", b"POST");
        head.set(b":path", b"/");
        head.set(b"content-length", b"12x");
        assert!(!head.well_formed());
    }
}
