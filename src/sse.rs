//! Writing server-sent events. Every event this function sends is one line of JSON (or
//! `[DONE]`), so `data: <payload>` (after `event: <name>` for named events) and a blank line
//! is the whole of the framing; reading
//! upstream events, where the full grammar matters, is `eventsource-stream`'s job.

use bytes::Bytes;

/// One `data:` event.
pub fn event(data: &str) -> Bytes {
    let mut frame = Vec::with_capacity(data.len() + 8);
    frame.extend_from_slice(b"data: ");
    frame.extend_from_slice(data.as_bytes());
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

/// One named event: `event: <name>` and its `data:` line (the Responses API names every event
/// by its type). `name` is a JSON string's content from a deployment's event: a line break in
/// it would end the field, so it is cut there.
pub fn named_event(name: &str, data: &str) -> Bytes {
    let name = name.split(['\r', '\n']).next().unwrap_or_default();
    let mut frame = Vec::with_capacity(name.len() + data.len() + 16);
    frame.extend_from_slice(b"event: ");
    frame.extend_from_slice(name.as_bytes());
    frame.extend_from_slice(b"\ndata: ");
    frame.extend_from_slice(data.as_bytes());
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

/// The event that tells an OpenAI client the answer is complete.
pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_data_lines_ended_by_a_blank_line() {
        assert_eq!(&event(r#"{"a":1}"#)[..], b"data: {\"a\":1}\n\n");
        assert_eq!(&done()[..], b"data: [DONE]\n\n");
        assert_eq!(
            &named_event("response.created", "{}")[..],
            b"event: response.created\ndata: {}\n\n"
        );
        assert_eq!(&named_event("a\nb", "{}")[..], b"event: a\ndata: {}\n\n");
    }
}
