//! What the process remembers of unfinished jobs, so that a job redelivered
//! after a lost broker session sends only the notifications whose outcome it
//! does not know.
//!
//! While a job is unfinished, the final outcomes of its tokens are noted
//! under its [`JobKey`]. When the broker session ends, the unfinished jobs
//! will be redelivered: their notes move to a memory keyed by the job's
//! [`Identity`] (the same job redelivered has the same identity, under a new
//! key), bounded by jobs and bytes, oldest forgotten first. A redelivered job
//! found there skips the tokens it knows and publishes their results again
//! (the broker may not have confirmed them). Outcomes that arrive after the
//! session ended (notifications in flight at the time) are noted too.
//!
//! Nothing survives the process, and another process knows nothing: a kill,
//! or a redelivery to another consumer, still sends such notifications twice.
//! Pure bookkeeping; the pipeline does the I/O.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use crate::job::JobKey;
use crate::results::Event;
use crate::token::Tokens;

/// Names a job across its deliveries: a hash of what it sends (id, app,
/// payload, every token) with its token count and payload length. Two jobs
/// that send the same notifications to the same devices are the same job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    hash: u64,
    tokens: u32,
    payload: u32,
}

impl Identity {
    pub fn of(id: Option<&str>, app: &str, payload: &[u8], tokens: &Tokens) -> Identity {
        let mut h = DefaultHasher::new();
        // The tokens as their two arrays, two writes: hashed one by one, a
        // fan-out job's 10,000 short writes cost 2% of the daemon's CPU.
        (id, app, payload, tokens).hash(&mut h);
        Identity {
            hash: h.finish(),
            tokens: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
            payload: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        }
    }
}

/// The final outcomes known for one job: which of its tokens (by position
/// in the job, so a bit each rather than a hashed copy of every token), and
/// the results they caused (published, maybe not confirmed). A redelivered
/// job has the same tokens in the same order (its [`Identity`] says so), so
/// positions carry over, and the job keeps its full token list: what is
/// known is skipped when its notifications are made, not cut from the list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Known {
    positions: Positions,
    results: Vec<Event>,
}

/// A set of token positions in one job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions {
    words: Vec<u64>,
    count: usize,
}

impl Positions {
    pub fn contains(&self, index: u32) -> bool {
        let (word, bit) = Self::at(index);
        self.words.get(word).is_some_and(|w| w & bit != 0)
    }

    /// How many positions it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `index`; true if it was not there.
    fn insert(&mut self, index: u32) -> bool {
        let (word, bit) = Self::at(index);
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let new = self.words[word] & bit == 0;
        self.words[word] |= bit;
        self.count += usize::from(new);
        new
    }

    fn union(&mut self, other: &Positions) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine |= theirs;
        }
        self.count = self.words.iter().map(|w| w.count_ones() as usize).sum();
    }

    fn bytes(&self) -> usize {
        self.words.capacity() * 8
    }

    fn at(index: u32) -> (usize, u64) {
        ((index / 64) as usize, 1 << (index % 64))
    }
}

/// What one entry costs, roughly: what the byte bound counts.
const ENTRY_BYTES: usize = 128;
const RESULT_BYTES: usize = 160;

impl Known {
    /// The positions of the job's tokens whose outcome is known.
    pub fn positions(&self) -> &Positions {
        &self.positions
    }

    /// The same, taken: what a redelivered job skips once its results are out.
    pub fn into_positions(self) -> Positions {
        self.positions
    }

    pub fn results(&self) -> &[Event] {
        &self.results
    }

    /// Of a job of `tokens` tokens, how many are left to send (every known
    /// position is one of them: the job's identity fixes its token count).
    pub fn remaining(&self, tokens: usize) -> usize {
        tokens.saturating_sub(self.positions.len())
    }

    fn add(&mut self, index: u32, result: Option<Event>) -> usize {
        let before = self.positions.bytes();
        self.positions.insert(index);
        let mut bytes = self.positions.bytes() - before;
        if let Some(event) = result {
            self.results.push(event);
            bytes += RESULT_BYTES;
        }
        bytes
    }

    fn bytes(&self) -> usize {
        ENTRY_BYTES + self.positions.bytes() + self.results.len() * RESULT_BYTES
    }
}

/// How much the memory of lost sessions may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub jobs: usize,
    pub bytes: usize,
}

impl Default for Limits {
    /// Enough for a few sessions' worth of a 20,000 prefetch.
    fn default() -> Self {
        Limits {
            jobs: 100_000,
            bytes: 32 << 20,
        }
    }
}

#[derive(Debug, Default)]
pub struct Recall {
    /// Unfinished jobs of the current session with an outcome known.
    live: HashMap<JobKey, (Identity, Known)>,
    /// Jobs of ended sessions, waiting for their redelivery.
    lost: HashMap<Identity, Known>,
    /// The order `lost` was filled in: the oldest is forgotten first.
    order: VecDeque<Identity>,
    /// Which identity a key of an ended session had, for late outcomes.
    lost_keys: HashMap<JobKey, Identity>,
    lost_bytes: usize,
    limits: Limits,
}

impl Recall {
    pub fn new(limits: Limits) -> Recall {
        Recall {
            limits,
            ..Recall::default()
        }
    }

    /// Notes a final outcome of the token at `index` of job `key` while the
    /// job is not final (`result`: the result it caused, if any). `identity` is asked
    /// only for a job not seen before; `session_over` says the job's session
    /// has ended (a notification that was in flight then).
    pub fn outcome(
        &mut self,
        key: JobKey,
        session_over: bool,
        identity: impl FnOnce() -> Identity,
        index: u32,
        result: Option<Event>,
    ) {
        if let Some((_, known)) = self.live.get_mut(&key) {
            known.add(index, result);
            return;
        }
        if !session_over {
            let mut known = Known::default();
            known.add(index, result);
            self.live.insert(key, (identity(), known));
            return;
        }
        let identity = match self.lost_keys.get(&key) {
            Some(&identity) => identity,
            None => identity(),
        };
        self.lose(key, identity, |known| known.add(index, result));
    }

    /// Job `key` is final: nothing about it is needed any more.
    pub fn finished(&mut self, key: JobKey) {
        self.live.remove(&key);
    }

    /// The session ended: its unfinished jobs will be redelivered.
    pub fn session_lost(&mut self) {
        for (key, (identity, known)) in std::mem::take(&mut self.live) {
            self.lose(key, identity, |into| {
                let before = into.bytes();
                into.positions.union(&known.positions);
                into.results.extend(known.results);
                into.bytes() - before
            });
        }
    }

    /// A job was redelivered: what is known of its earlier deliveries, if
    /// anything, moves to its new key `key` (in case this session ends too).
    pub fn redelivered(&mut self, key: JobKey, identity: Identity) -> Option<Known> {
        let known = self.lost.remove(&identity)?;
        self.lost_bytes -= known.bytes();
        self.order.retain(|i| *i != identity);
        self.live.insert(key, (identity, known.clone()));
        Some(known)
    }

    /// Jobs remembered from ended sessions.
    pub fn lost_jobs(&self) -> usize {
        self.lost.len()
    }

    pub fn lost_bytes(&self) -> usize {
        self.lost_bytes
    }

    fn lose(&mut self, key: JobKey, identity: Identity, add: impl FnOnce(&mut Known) -> usize) {
        self.lost_keys.insert(key, identity);
        let known = match self.lost.get_mut(&identity) {
            Some(known) => known,
            None => {
                self.order.push_back(identity);
                self.lost_bytes += ENTRY_BYTES;
                self.lost.entry(identity).or_default()
            }
        };
        self.lost_bytes += add(known);
        while self.lost.len() > self.limits.jobs || self.lost_bytes > self.limits.bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.lost.remove(&oldest) {
                self.lost_bytes -= gone.bytes();
            }
        }
        if self.lost_keys.len() > self.limits.jobs.saturating_mul(2) {
            let lost = &self.lost;
            self.lost_keys
                .retain(|_, identity| lost.contains_key(identity));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::apns::Reason;
    use crate::token::DeviceToken;

    fn tok(n: u8) -> DeviceToken {
        DeviceToken::from_bytes([n; 32])
    }

    fn tokens(ns: &[u8]) -> Tokens {
        let mut t = Tokens::with_capacity(ns.len());
        for &n in ns {
            t.push(&tok(n));
        }
        t
    }

    fn id(ns: &[u8]) -> Identity {
        Identity::of(Some("job-1"), "app", b"{\"aps\":{}}", &tokens(ns))
    }

    fn failed(n: u8) -> Event {
        Event::Failed {
            app: Arc::from("app"),
            id: Some(Arc::from("job-1")),
            to: crate::apns::Recipient::Device(tok(n)),
            reason: Reason::Binary(crate::apns::frame::Status::InvalidToken),
            attempts: 1,
        }
    }

    #[test]
    fn identity_covers_what_the_job_sends() {
        let base = id(&[1, 2]);
        assert_eq!(base, id(&[1, 2]));
        assert_ne!(base, id(&[1, 3]));
        assert_ne!(base, id(&[1, 2, 3]));
        assert_ne!(
            base,
            Identity::of(Some("job-2"), "app", b"{\"aps\":{}}", &tokens(&[1, 2]))
        );
        assert_ne!(
            base,
            Identity::of(Some("job-1"), "app", b"{\"aps\":{ }}", &tokens(&[1, 2]))
        );
        assert_ne!(
            base,
            Identity::of(None, "app", b"{\"aps\":{}}", &tokens(&[1, 2]))
        );
    }

    #[test]
    fn a_lost_session_hands_its_known_outcomes_to_the_redelivery() {
        let mut r = Recall::new(Limits::default());
        let job = id(&[1, 2, 3]);
        r.outcome(JobKey(1), false, || job, 0, None);
        r.outcome(JobKey(1), false, || unreachable!(), 1, Some(failed(2)));
        assert_eq!(r.lost_jobs(), 0, "the session still runs");
        r.session_lost();
        assert_eq!(r.lost_jobs(), 1);
        let known = r.redelivered(JobKey(7), job).expect("known");
        assert!(known.positions().contains(0) && known.positions().contains(1));
        assert!(!known.positions().contains(2));
        assert_eq!(known.results(), [failed(2)]);
        assert_eq!((known.remaining(3), known.positions().len()), (1, 2));
        assert_eq!((r.lost_jobs(), r.lost_bytes()), (0, 0));
        assert!(r.redelivered(JobKey(8), job).is_none(), "taken once");
    }

    #[test]
    fn finished_jobs_are_forgotten() {
        let mut r = Recall::new(Limits::default());
        r.outcome(JobKey(1), false, || id(&[1, 2]), 0, None);
        r.finished(JobKey(1));
        r.session_lost();
        assert_eq!(r.lost_jobs(), 0);
        assert!(r.redelivered(JobKey(2), id(&[1, 2])).is_none());
    }

    #[test]
    fn outcomes_after_the_session_ended_are_remembered() {
        let mut r = Recall::new(Limits::default());
        let job = id(&[1, 2]);
        r.outcome(JobKey(1), false, || job, 0, None);
        r.session_lost();
        // In flight when the session ended: the lane reports it later.
        r.outcome(JobKey(1), true, || unreachable!(), 1, None);
        // A job with nothing known before the loss.
        let other = id(&[9]);
        r.outcome(JobKey(2), true, || other, 0, None);
        let known = r.redelivered(JobKey(3), job).expect("known");
        assert!(known.positions().contains(0) && known.positions().contains(1));
        assert!(r.redelivered(JobKey(4), other).is_some());
    }

    #[test]
    fn a_redelivered_job_keeps_its_memory_if_that_session_ends_too() {
        let mut r = Recall::new(Limits::default());
        let job = id(&[1, 2, 3]);
        r.outcome(JobKey(1), false, || job, 0, None);
        r.session_lost();
        r.redelivered(JobKey(2), job).expect("known");
        r.outcome(JobKey(2), false, || unreachable!(), 1, None);
        r.session_lost();
        let known = r.redelivered(JobKey(3), job).expect("known");
        assert!(known.positions().contains(0) && known.positions().contains(1));
        assert!(!known.positions().contains(2));
    }

    #[test]
    fn memory_is_bounded_by_jobs_oldest_first() {
        let mut r = Recall::new(Limits {
            jobs: 2,
            bytes: usize::MAX,
        });
        for n in 1..=3u8 {
            r.outcome(JobKey(u64::from(n)), true, || id(&[n]), 0, None);
        }
        assert_eq!(r.lost_jobs(), 2);
        assert!(
            r.redelivered(JobKey(10), id(&[1])).is_none(),
            "the oldest went"
        );
        assert!(r.redelivered(JobKey(11), id(&[3])).is_some());
    }

    #[test]
    fn memory_is_bounded_by_bytes() {
        let one = {
            let mut r = Recall::new(Limits::default());
            r.outcome(JobKey(1), true, || id(&[1]), 0, Some(failed(1)));
            r.lost_bytes()
        };
        let mut r = Recall::new(Limits {
            jobs: usize::MAX,
            bytes: 3 * one,
        });
        for n in 1..=5u8 {
            r.outcome(JobKey(u64::from(n)), true, || id(&[n]), 0, Some(failed(n)));
            assert!(r.lost_bytes() <= 3 * one);
        }
        assert_eq!(r.lost_jobs(), 3);
        assert!(r.redelivered(JobKey(9), id(&[5])).is_some());
    }

    #[test]
    fn positions_span_words_and_merge() {
        let mut a = Positions::default();
        assert!(a.is_empty() && !a.contains(0) && !a.contains(9_999));
        assert!(a.insert(0) && a.insert(64) && a.insert(9_999));
        assert!(!a.insert(64), "already there");
        assert_eq!(a.len(), 3);
        assert!(a.contains(9_999) && !a.contains(9_998) && !a.contains(65));
        let mut b = Positions::default();
        b.insert(1);
        b.insert(64);
        b.union(&a);
        assert_eq!(b.len(), 4);
        assert!([0, 1, 64, 9_999].iter().all(|&i| b.contains(i)));
    }
}
