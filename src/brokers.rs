//! Several broker nodes: which one a process talks to, and how it is named
//! where operators look.
//!
//! A fleet of apnsd processes sharing a RabbitMQ cluster should spread over
//! its nodes, so each process starts at a random node; when a node refuses a
//! session or the session dies, the next attempt goes to the next node (the
//! supervisor's backoff still spaces the attempts, so a cluster that is down
//! as a whole is not hammered). Pure policy: the supervisor does the I/O.

use std::fmt;

use lapin::uri::AMQPUri;
use serde::{Deserialize, Deserializer};

/// The broker URIs of `amqp.uri`: one or more, in the operator's order.
/// Never empty, so there is always a node to try.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUris(Vec<String>);

impl BrokerUris {
    /// `None` for an empty list.
    pub fn new(uris: Vec<String>) -> Option<BrokerUris> {
        (!uris.is_empty()).then_some(BrokerUris(uris))
    }

    pub fn single(uri: impl Into<String>) -> BrokerUris {
        BrokerUris(vec![uri.into()])
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true; there for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, index: usize) -> &str {
        &self.0[index % self.0.len()]
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

/// Debug shows the nodes, never the userinfo.
impl fmt::Debug for BrokerUris {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|u| node_label(u)))
            .finish()
    }
}

impl Default for BrokerUris {
    fn default() -> Self {
        BrokerUris::single("amqp://guest:guest@127.0.0.1:5672/%2f")
    }
}

impl<'de> Deserialize<'de> for BrokerUris {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a URI string or a list of URI strings")
        })? {
            OneOrMany::One(uri) => Ok(BrokerUris::single(uri)),
            OneOrMany::Many(uris) => BrokerUris::new(uris)
                .ok_or_else(|| serde::de::Error::custom("the list of broker URIs is empty")),
        }
    }
}

/// Which node a process tries: a cursor over [`BrokerUris`] that starts
/// where it is told (at random in the daemon) and moves on after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    len: usize,
    current: usize,
}

impl Rotation {
    /// A rotation over `len` nodes (at least one) starting at `start % len`.
    pub fn new(len: usize, start: usize) -> Rotation {
        let len = len.max(1);
        Rotation {
            len,
            current: start % len,
        }
    }

    /// Starts at a random node, so that a fleet spreads over the cluster.
    pub fn random(len: usize) -> Rotation {
        Rotation::new(len, rand::random_range(0..len.max(1)))
    }

    /// The index of the node to use now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The session on the current node failed or ended: use the next one.
    /// A lone node stays where it is.
    pub fn advance(&mut self) {
        self.current = (self.current + 1) % self.len;
    }
}

/// `host:port` of a URI (`host:port/vhost` for a vhost other than `/`),
/// without scheme, user or password: what a log line or a metric label may
/// show. A URI that does not parse is `invalid`.
pub fn node_label(uri: &str) -> String {
    match uri.parse::<AMQPUri>() {
        Ok(parsed) if parsed.vhost == "/" => {
            format!("{}:{}", parsed.authority.host, parsed.authority.port)
        }
        Ok(parsed) => format!(
            "{}:{}/{}",
            parsed.authority.host, parsed.authority.port, parsed.vhost
        ),
        Err(_) => "invalid".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uris(list: &[&str]) -> BrokerUris {
        BrokerUris::new(list.iter().map(|s| s.to_string()).collect()).expect("non-empty")
    }

    #[test]
    fn rotation_visits_every_node_in_order_from_its_start() {
        let mut r = Rotation::new(3, 1);
        let seen: Vec<usize> = (0..6)
            .map(|_| {
                let c = r.current();
                r.advance();
                c
            })
            .collect();
        assert_eq!(seen, [1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn a_lone_node_is_always_current() {
        let mut r = Rotation::new(1, 7);
        assert_eq!(r.current(), 0);
        r.advance();
        assert_eq!(r.current(), 0);
    }

    #[test]
    fn start_wraps_and_zero_nodes_means_one() {
        assert_eq!(Rotation::new(3, 4).current(), 1);
        assert_eq!(Rotation::new(0, 5).current(), 0);
    }

    #[test]
    fn random_starts_spread_over_every_node() {
        let mut hits = [0usize; 3];
        for _ in 0..300 {
            hits[Rotation::random(3).current()] += 1;
        }
        // Each node is the start for a third on average; 300 draws leave
        // one at zero with probability (2/3)^300 per node.
        assert!(hits.iter().all(|&h| h > 0), "{hits:?}");
    }

    #[test]
    fn label_has_no_userinfo() {
        assert_eq!(
            node_label("amqp://apnsd:s3cret@rabbit-2.example:5673/%2f"),
            "rabbit-2.example:5673"
        );
        assert_eq!(node_label("amqp://h/prod"), "h:5672/prod");
        assert_eq!(node_label("amqps://u:p@h"), "h:5671");
        assert_eq!(node_label("not a uri"), "invalid");
    }

    #[test]
    fn debug_shows_nodes_only() {
        let shown = format!("{:?}", uris(&["amqp://u:pw@a:1/%2f", "amqp://b"]));
        assert!(!shown.contains("pw") && !shown.contains("u:"), "{shown}");
        assert!(shown.contains("a:1") && shown.contains("b:5672"), "{shown}");
    }

    #[test]
    fn get_wraps_and_iter_keeps_order() {
        let list = uris(&["amqp://a", "amqp://b"]);
        assert_eq!(list.get(3), "amqp://b");
        assert_eq!(list.iter().collect::<Vec<_>>(), ["amqp://a", "amqp://b"]);
        assert_eq!(list.len(), 2);
        assert!(!list.is_empty());
    }

    #[derive(Deserialize)]
    struct Amqp {
        uri: BrokerUris,
    }

    #[test]
    fn deserializes_a_string_or_a_list() {
        let one: Amqp = serde_json::from_str(r#"{"uri": "amqp://a"}"#).expect("string");
        assert_eq!(one.uri, uris(&["amqp://a"]));
        let many: Amqp =
            serde_json::from_str(r#"{"uri": ["amqp://a", "amqp://b"]}"#).expect("list");
        assert_eq!(many.uri, uris(&["amqp://a", "amqp://b"]));
        let empty = serde_json::from_str::<Amqp>(r#"{"uri": []}"#)
            .err()
            .expect("empty");
        assert!(empty.to_string().contains("empty"), "{empty}");
        let number = serde_json::from_str::<Amqp>(r#"{"uri": 5}"#)
            .err()
            .expect("number");
        assert!(number.to_string().contains("list of URI"), "{number}");
    }
}
