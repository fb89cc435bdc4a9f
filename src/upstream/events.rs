//! A deployment's streamed answer, read: server-sent events (parsed by `eventsource-stream`)
//! told apart by what they are to the caller (each kind of call tells its own events apart), and
//! the opening read up to the first content, which decides whether the stream is worth
//! committing to.

use std::pin::Pin;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use reqwest::Response;
use serde_json::Value;

use crate::outcome::{ContentFilter, Failure, Transient};

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

/// The events of one streamed answer, and how its kind of call tells them apart.
pub struct EventStream {
    events: Events,
    classify: fn(&str) -> StreamEvent,
}

/// What one upstream event is to the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Done,
    /// Malformed, or one of Azure's own events (empty first event with prompt_filter_results,
    /// asynchronous filter results with `"id":""`) that OpenAI clients do not expect.
    Skip,
    /// The deployment's safety system stopped the answer: its error event, to pass on as sent.
    Refused {
        data: String,
        filter: ContentFilter,
    },
    /// Another error event: the deployment stopped for its own reasons (its JSON).
    Error(String),
    Chunk(Chunk),
}

/// A chunk of the answer, to relay.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Its JSON, as sent.
    pub data: String,
    /// The answer's id, as this chunk gives it (when it gives a non-empty one).
    pub id: Option<String>,
    /// The text it adds to the answer (chat: the first choice's `delta.content`).
    pub text: String,
    /// It carries content: text, a refusal, a tool call.
    pub content: bool,
    /// Its `finish_reason`, when it has one.
    pub finish: Option<String>,
    /// It carries what a continuation cannot take over: a tool call, a refusal, several choices,
    /// log probabilities.
    pub opaque: bool,
    /// Its `usage` object, when it has one.
    pub usage: Option<Value>,
    /// The output item it belongs to (Responses' `item_id`), when it says.
    pub item: Option<String>,
    /// Its `sequence_number`, for kinds whose events are numbered (Responses).
    pub sequence: Option<u64>,
    /// It closes a part of the answer and repeats its text (Responses' `*.done` events): a
    /// resumed stream's are relayed, with the whole answer's text.
    pub closing: bool,
}

/// What reading the next event came to.
#[derive(Debug)]
pub enum Next {
    Event(StreamEvent),
    /// The body ended.
    End,
    /// The connection broke.
    Broken,
}

impl EventStream {
    pub(super) fn new(response: Response, classify: fn(&str) -> StreamEvent) -> Self {
        Self {
            events: Box::pin(response.bytes_stream().eventsource()),
            classify,
        }
    }

    pub async fn next(&mut self) -> Next {
        match self.events.next().await {
            None => Next::End,
            Some(Err(_)) => Next::Broken,
            Some(Ok(event)) => Next::Event((self.classify)(&event.data)),
        }
    }
}

/// A deployment's stream that has produced content (or finished), ready to be relayed.
pub struct Opened {
    pub events: EventStream,
    /// The events read so far, worth relaying: chunks up to the first content, or `[DONE]`.
    pub head: Vec<StreamEvent>,
}

/// Reads a fresh 2xx stream up to its first content (or its end, if it has none), keeping the
/// events worth relaying. A stream that ends or errs before then is a failure of this attempt,
/// and a refusal is the deployment's answer; the caller bounds how long this may take.
pub(super) async fn first_content(mut events: EventStream) -> Result<Opened, Failure> {
    let mut head = Vec::new();
    loop {
        let event = match events.next().await {
            Next::End | Next::Broken => return Err(Failure::Transient(Transient::Reset)),
            Next::Event(event) => event,
        };
        let opened = match &event {
            StreamEvent::Skip => continue,
            StreamEvent::Refused { filter, .. } => {
                return Err(Failure::ContentFiltered(Box::new(filter.clone())));
            }
            StreamEvent::Error(_) => return Err(Failure::Transient(Transient::BadResponse)),
            // A complete answer with no content at all is still a complete answer.
            StreamEvent::Done => true,
            StreamEvent::Chunk(chunk) => chunk.content || chunk.finish.is_some(),
        };
        head.push(event);
        if opened {
            return Ok(Opened { events, head });
        }
    }
}
