//! The seam between kinds of call. What one kind does its own way is one implementation of
//! these traits, in its own file (`chat.rs`, `embeddings.rs`, `responses.rs`): where a deployment takes it, what `model` the body
//! carries, how a whole answer is read and how many tokens it used, how its stream's events are
//! told apart, and how a stream cut after its first content is continued elsewhere. The failover
//! loop, the relay and the upstream client are written once, for every kind.

use bytes::Bytes;
use serde_json::Value;

use crate::outcome::{Failure, JsonBody};
use crate::pool::Deployment;

use super::events::{Chunk, StreamEvent};

/// Every kind of call, as the upstream client keeps their URLs (one slot each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindId {
    /// `chat/completions`.
    Chat,
    /// `embeddings`.
    Embeddings,
    /// `responses` (and the stored responses under it).
    Responses,
}

impl KindId {
    pub const ALL: [KindId; 3] = [KindId::Chat, KindId::Embeddings, KindId::Responses];

    /// Its slot in per-kind tables.
    pub fn slot(self) -> usize {
        self as usize
    }
}

/// A kind of call.
pub trait Kind: Send + Sync + 'static {
    const ID: KindId;
    /// What a whole (not streamed) answer is read into.
    type Answer: Send + 'static;

    /// Where deployment `d` takes this kind of call.
    fn url(d: &Deployment) -> String;

    /// The `model` the body must carry for deployment `d`, if any: the deployment's name on v1
    /// servers, where the path does not name it.
    fn model(d: &Deployment) -> Option<&str> {
        d.model()
    }

    /// A 2xx answer's body: the answer, or why it is not one. Error answers are read alike for
    /// every kind (`wire::classify`).
    fn answer(body: Bytes) -> Result<Self::Answer, Failure>;

    /// The tokens the answer used, when it says.
    fn tokens(answer: &Self::Answer) -> Option<u64>;
}

/// What a relay asks of a chunk it passes on: its id, text or usage replaced; for kinds whose
/// events carry them, the item it belongs to, its sequence number, and the whole answer's text
/// where the event repeats it (a Responses `*.done` event).
#[derive(Debug, Clone, Copy, Default)]
pub struct Edit<'a> {
    pub id: Option<&'a str>,
    pub text: Option<&'a str>,
    pub usage: Option<&'a Value>,
    pub item: Option<&'a str>,
    pub sequence: Option<u64>,
    pub whole: Option<&'a str>,
}

/// What broken streams spent before the stream that finished an answer took over.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spent {
    /// Content chunks they sent (about one token each, as Azure streams).
    pub chunks: u64,
    /// How many broke.
    pub broken: u64,
}

/// A kind of call that can be streamed as server-sent events.
pub trait Streaming: Kind {
    /// Tells one event's data apart.
    fn event(data: &str) -> StreamEvent;

    /// Whether a stream for `body` can be continued as one text at all (several choices or log
    /// probabilities cannot).
    fn continuable(body: &JsonBody) -> bool;

    /// The request that asks another deployment to go on with `sent`, the text already relayed;
    /// `spent` tokens of the original's allowance are used.
    fn continuation(body: &JsonBody, sent: &str, spent: u64) -> JsonBody;

    /// `chunk`'s JSON with what `edit` replaces.
    fn rewrite(chunk: &Chunk, edit: Edit<'_>) -> String;

    /// The usage of a stream that finished an answer others began, with an estimate of what the
    /// broken ones used added.
    fn usage(usage: &Value, spent: Spent) -> Value;

    /// One event's data on the wire to the caller.
    fn frame(data: &str) -> Bytes {
        crate::sse::event(data)
    }

    /// `body` asking for the stream's usage, when it does not already and the kind can ask
    /// (chat's `stream_options.include_usage`): every answer's tokens are then counted.
    fn with_usage(_body: &JsonBody) -> Option<JsonBody> {
        None
    }

    /// Whether the caller of `body` asked to see the usage event ([`Streaming::with_usage`]
    /// may have asked for it on the caller's behalf: it is then counted, not relayed).
    fn shows_usage(_body: &JsonBody) -> bool {
        true
    }

    /// Whether the answer to `body` is stored where it was made, so that the fleet must
    /// remember where (its id, as the stream gives it).
    fn pins(_body: &JsonBody) -> bool {
        false
    }
}
