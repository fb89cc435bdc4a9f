//! Streamed (`"stream": true`) answers over real HTTP, and the stream failure behaviours.

mod common;

use std::time::{Duration, Instant};

use azure_openai_emulator::{Behavior, Emulator, RetryAfter};
use serde_json::{Value, json};

const TEXT: &str = "hello  wide\nworld";
const ANSWER: &str = "[d] You said: hello  wide\nworld";

fn body(stream: bool, usage: bool) -> Value {
    let mut body = json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": TEXT},
    ]});
    if stream {
        body["stream"] = json!(true);
    }
    if usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

async fn start(behavior: Behavior) -> Emulator {
    Emulator::builder()
        .deployment("d", behavior)
        .deployment("other", Behavior::Healthy)
        .start()
        .await
        .expect("emulator starts")
}

async fn send(emu: &Emulator, deployment: &str, body: &Value) -> reqwest::Response {
    common::client()
        .post(format!(
            "{}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21",
            emu.url()
        ))
        .header("api-key", emu.api_key())
        .json(body)
        .send()
        .await
        .expect("emulator answers")
}

/// Reads a streamed body as it arrives: the `data:` payloads with their arrival times.
struct Reader {
    resp: reqwest::Response,
    buf: Vec<u8>,
    events: Vec<(Instant, String)>,
}

impl Reader {
    async fn open(emu: &Emulator, body: &Value) -> Reader {
        let resp = send(emu, "d", body).await;
        assert_eq!(resp.status(), 200);
        let content_type = resp.headers().get("content-type");
        assert_eq!(
            content_type.map(|v| v.as_bytes()),
            Some(&b"text/event-stream"[..])
        );
        Reader {
            resp,
            buf: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Reads until `n` events have arrived, the body ends (`Ok(false)`) or fails (`Err`).
    async fn until(&mut self, n: usize) -> Result<bool, reqwest::Error> {
        while self.events.len() < n {
            let Some(bytes) = self.resp.chunk().await? else {
                assert!(self.buf.is_empty(), "unterminated event at the end");
                return Ok(false);
            };
            self.buf.extend_from_slice(&bytes);
            while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(block).expect("utf-8");
                let data = text.strip_prefix("data: ").expect("a data: line");
                self.events
                    .push((Instant::now(), data.trim_end().to_owned()));
            }
        }
        Ok(true)
    }

    /// Reads the rest of a body that ends cleanly.
    async fn read_to_end(&mut self) -> Vec<String> {
        assert!(!self.until(usize::MAX).await.expect("a clean end"));
        self.payloads()
    }

    fn payloads(&self) -> Vec<String> {
        self.events.iter().map(|(_, e)| e.clone()).collect()
    }
}

fn json_of(event: &str) -> Value {
    serde_json::from_str(event).unwrap_or_else(|e| panic!("{e}: {event}"))
}

/// The concatenated `delta.content` of the valid events.
fn content(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Whether an error comes from an RST (`ECONNRESET`) somewhere down its source chain.
fn is_reset(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        let io = e.downcast_ref::<std::io::Error>();
        if io.is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset) {
            return true;
        }
        cause = e.source();
    }
    false
}

fn safe_filters() -> Value {
    let safe = json!({"filtered": false, "severity": "safe"});
    json!({"hate": safe, "self_harm": safe, "sexual": safe, "violence": safe})
}

#[tokio::test]
async fn a_healthy_stream_has_azures_events_in_order() {
    let emu = start(Behavior::Healthy).await;
    let plain: Value = send(&emu, "d", &body(false, false))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(plain["choices"][0]["message"]["content"], ANSWER);

    for usage in [false, true] {
        let mut reader = Reader::open(&emu, &body(true, usage)).await;
        let header = |name: &str| {
            let value = reader.resp.headers().get(name);
            value.and_then(|v| v.to_str().ok()).map(str::to_owned)
        };
        assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
        assert_eq!(header("x-request-id").map(|id| id.len()), Some(36));
        assert_eq!(header("apim-request-id").map(|id| id.len()), Some(36));
        assert_eq!(
            header("x-ratelimit-remaining-requests").as_deref(),
            Some("99")
        );
        assert_eq!(
            header("x-ratelimit-remaining-tokens").as_deref(),
            Some("99000")
        );

        let events = reader.read_to_end().await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| json_of(e))
            .collect();
        let (opening, chunks) = chunks.split_first().expect("events");
        assert_eq!(
            opening,
            &json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": safe_filters()}]})
        );
        let id = chunks[0]["id"].as_str().expect("id");
        assert!(id.starts_with("chatcmpl-"), "{id}");
        for chunk in chunks {
            assert_eq!(chunk["id"], id);
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert!(chunk["created"].as_u64().is_some_and(|t| t > 1_700_000_000));
            assert_eq!(chunk["model"], "d");
            assert_eq!(chunk["system_fingerprint"], "fp_emu");
        }
        let (usage_chunk, chunks) = match usage {
            true => chunks
                .split_last()
                .map(|(u, c)| (Some(u), c))
                .expect("usage"),
            false => (None, chunks),
        };
        let (role, chunks) = chunks.split_first().expect("role chunk");
        assert_eq!(
            role["choices"],
            json!([{"index": 0, "finish_reason": null, "logprobs": null, "content_filter_results": {},
                "delta": {"role": "assistant", "content": "", "refusal": null}}])
        );
        let (stop, words) = chunks.split_last().expect("stop chunk");
        assert_eq!(
            stop["choices"],
            json!([{"index": 0, "finish_reason": "stop", "logprobs": null, "delta": {},
                "content_filter_results": {}}])
        );
        let pieces: Vec<&str> = words
            .iter()
            .map(|w| {
                let choice = &w["choices"][0];
                assert_eq!(choice["finish_reason"], Value::Null);
                assert_eq!(choice["content_filter_results"], safe_filters());
                choice["delta"]["content"].as_str().expect("content delta")
            })
            .collect();
        assert_eq!(
            pieces,
            ["[d] ", "You ", "said: ", "hello  ", "wide\n", "world"]
        );
        assert_eq!(pieces.concat(), ANSWER);

        match usage_chunk {
            Some(chunk) => {
                assert_eq!(chunk["choices"], json!([]));
                assert_eq!(chunk["usage"], plain["usage"]);
            }
            None => assert!(chunks.iter().all(|c| c.get("usage").is_none())),
        }
    }

    // Stream requests are recorded like any other.
    let recorded = emu.requests("d");
    assert_eq!(recorded.len(), 3);
    assert_eq!(recorded[2].body, body(true, true));
}

#[tokio::test]
async fn latency_comes_before_the_headers_and_the_chunk_delay_between_events() {
    let emu = start(Behavior::Healthy).await;
    emu.set_latency("d", Duration::from_millis(200));
    emu.set_chunk_delay("d", Duration::from_millis(40));
    let started = Instant::now();
    let mut reader = Reader::open(&emu, &body(true, false)).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    let events = reader.read_to_end().await;
    assert_eq!(events.len(), 10, "{events:?}");
    let times: Vec<Instant> = reader.events.iter().map(|(t, _)| *t).collect();
    let spread = times[9] - times[0];
    assert!(spread >= Duration::from_millis(9 * 40), "{spread:?}");
    assert!(spread < Duration::from_secs(3), "{spread:?}");

    // Non-streaming answers keep their single body.
    let resp = send(&emu, "d", &body(false, false)).await;
    let content_type = resp.headers().get("content-type").cloned();
    assert_eq!(
        content_type.as_ref().map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
}

#[tokio::test]
async fn stream_cut_delivers_some_chunks_then_a_body_error() {
    let emu = start(Behavior::StreamCut { after: 2 }).await;
    for late in [false, true, false] {
        let mut reader = Reader::open(&emu, &body(true, true)).await;
        if late {
            // Chunks sent before the reset are still delivered to a client that reads late.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let err = reader.until(usize::MAX).await.expect_err("cut mid-body");
        assert!(is_reset(&err), "a TCP reset: {err:?}");
        let events = reader.payloads();
        assert_eq!(events.len(), 4, "opening, role, 2 chunks: {events:?}");
        assert_eq!(content(&events), "[d] You ");
        assert!(!events.contains(&"[DONE]".to_owned()));
    }

    // Past the end: every content chunk, still no finish chunk.
    emu.set("d", Behavior::StreamCut { after: 99 });
    let mut reader = Reader::open(&emu, &body(true, false)).await;
    assert!(reader.until(usize::MAX).await.is_err());
    assert_eq!(content(&reader.payloads()), ANSWER);
    assert!(reader.payloads().iter().all(|e| !e.contains("\"stop\"")));

    // A non-streaming request gets a healthy answer.
    let resp = send(&emu, "d", &body(false, false)).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.expect("json");
    assert_eq!(answer["choices"][0]["message"]["content"], ANSWER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_stall_goes_silent_with_the_connection_open() {
    let emu = start(Behavior::StreamStall { after: 2 }).await;
    let mut reader = Reader::open(&emu, &body(true, false)).await;
    assert!(reader.until(4).await.expect("first events"));
    assert_eq!(content(&reader.payloads()), "[d] You ");
    let silent = tokio::time::timeout(Duration::from_millis(300), reader.until(5)).await;
    assert!(
        silent.is_err(),
        "nothing more arrives: {:?}",
        reader.payloads()
    );

    // Others are served meanwhile.
    assert_eq!(send(&emu, "other", &body(true, false)).await.status(), 200);

    // Still open (no end, no error) until the emulator goes away.
    let pending = tokio::spawn(async move { reader.until(5).await.map_err(|e| e.to_string()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());
    drop(emu);
    let outcome = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("dropping the emulator ends the stall")
        .expect("task");
    assert!(outcome.is_err(), "an incomplete body: {outcome:?}");
}

#[tokio::test]
async fn stream_corrupt_inserts_bad_events_and_finishes() {
    let emu = start(Behavior::StreamCorrupt { at: 1 }).await;
    let events = Reader::open(&emu, &body(true, false))
        .await
        .read_to_end()
        .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    // opening, role, chunk 0, then the two bad ones right before chunk 1
    assert_eq!(events[3], r#"{"choices":[{"delta":{"content": BROKEN"#);
    assert!(serde_json::from_str::<Value>(&events[3]).is_err());
    assert_eq!(json_of(&events[4]), json!({"unexpected": true}));
    assert_eq!(
        json_of(&events[5])["choices"][0]["delta"]["content"],
        "You "
    );
    assert_eq!(content(&events), ANSWER);
    assert_eq!(events.len(), 2 + 6 + 2 + 2);
}

#[tokio::test]
async fn stream_no_done_ends_cleanly_after_the_stop_chunk() {
    let emu = start(Behavior::StreamNoDone).await;
    let events = Reader::open(&emu, &body(true, true))
        .await
        .read_to_end()
        .await;
    assert!(!events.contains(&"[DONE]".to_owned()));
    let n = events.len();
    assert_eq!(
        json_of(&events[n - 2])["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(json_of(&events[n - 1])["usage"]["total_tokens"].is_u64());
    assert_eq!(content(&events), ANSWER);
}

#[tokio::test]
async fn stream_slow_start_sends_the_first_event_then_waits() {
    let emu = start(Behavior::StreamSlowStart { ms: 600 }).await;
    let started = Instant::now();
    let mut reader = Reader::open(&emu, &body(true, false)).await;
    assert!(reader.until(1).await.expect("opening event"));
    let first = reader.events[0].0;
    assert!(
        first - started < Duration::from_millis(400),
        "{:?}",
        first - started
    );
    assert!(json_of(&reader.events[0].1)["prompt_filter_results"].is_array());
    let events = reader.read_to_end().await;
    let role = reader.events[1].0;
    assert!(
        role - first >= Duration::from_millis(500),
        "{:?}",
        role - first
    );
    assert!(role - first < Duration::from_secs(3), "{:?}", role - first);
    assert_eq!(
        json_of(&events[1])["choices"][0]["delta"]["role"],
        "assistant"
    );
    assert_eq!(content(&events), ANSWER);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn stream_async_filter_adds_azures_offsets_event() {
    let emu = start(Behavior::StreamAsyncFilter).await;
    let events = Reader::open(&emu, &body(true, false))
        .await
        .read_to_end()
        .await;
    // opening, role, chunk 0, chunk 1, then the filter event
    let filter = json_of(&events[4]);
    assert_eq!(
        filter,
        json!({"choices": [{"index": 0, "finish_reason": null, "delta": {},
            "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 20},
            "content_filter_results": safe_filters()}],
            "created": 0, "id": "", "model": "", "object": ""})
    );
    assert_eq!(content(&events), ANSWER);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn output_filtered_stream_stops_early_with_content_filter() {
    let emu = start(Behavior::OutputFiltered).await;
    let events = Reader::open(&emu, &body(true, false))
        .await
        .read_to_end()
        .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text = content(&events);
    assert!(
        !text.is_empty() && ANSWER.starts_with(&text) && text != ANSWER,
        "{text:?}"
    );
    let finish = &json_of(&events[events.len() - 2])["choices"][0];
    assert_eq!(finish["finish_reason"], "content_filter");
    assert_eq!(finish["delta"], json!({}));
    assert_eq!(
        finish["content_filter_results"]["violence"],
        json!({"filtered": true, "severity": "medium"})
    );
}

#[tokio::test]
async fn error_behaviours_answer_stream_requests_with_json_errors() {
    let emu = start(Behavior::Healthy).await;
    let cases = [
        (Behavior::Throttled(RetryAfter::Seconds(7)), 429),
        (Behavior::ServerError, 500),
        (Behavior::Unavailable, 503),
        (Behavior::UnavailableRetryAfter(2), 503),
        (Behavior::RequestTimeout, 408),
        (Behavior::ContentFilter, 400),
        (Behavior::ContextLengthExceeded, 400),
        (Behavior::DeploymentNotFound, 404),
        (Behavior::Unauthorized, 401),
    ];
    for (behavior, status) in cases {
        emu.push("d", behavior.clone());
        let resp = send(&emu, "d", &body(true, true)).await;
        assert_eq!(resp.status(), status, "{behavior}");
        let content_type = resp.headers().get("content-type").cloned();
        assert_eq!(
            content_type.as_ref().map(|v| v.as_bytes()),
            Some(&b"application/json"[..]),
            "{behavior}"
        );
        if status == 429 {
            assert!(resp.headers().contains_key("retry-after"));
        }
        let error: Value = resp.json().await.expect("json");
        assert!(error["error"]["message"].is_string(), "{behavior}: {error}");
    }

    emu.push("d", Behavior::ResetConnection);
    let client = common::client();
    let url = format!(
        "{}/openai/deployments/d/chat/completions?api-version=v",
        emu.url()
    );
    let sent = client.post(&url).header("api-key", emu.api_key());
    assert!(sent.json(&body(true, false)).send().await.is_err());

    emu.push("d", Behavior::Hang);
    let sent = client.post(&url).header("api-key", emu.api_key());
    let hung = tokio::time::timeout(
        Duration::from_millis(300),
        sent.json(&body(true, false)).send(),
    );
    assert!(hung.await.is_err(), "no response at all");
    assert_eq!(emu.calls("d"), 9 + 2);
}

#[test]
fn stream_behaviours_round_trip_as_text() {
    let forms = [
        ("stream-cut:3", Behavior::StreamCut { after: 3 }),
        ("stream-stall:2", Behavior::StreamStall { after: 2 }),
        ("stream-corrupt:1", Behavior::StreamCorrupt { at: 1 }),
        ("stream-no-done", Behavior::StreamNoDone),
        (
            "stream-slow-start:2000",
            Behavior::StreamSlowStart { ms: 2000 },
        ),
        ("stream-async-filter", Behavior::StreamAsyncFilter),
        ("stream-tool-cut:2", Behavior::StreamToolCut { after: 2 }),
        ("content-policy", Behavior::ContentPolicy),
        ("no-prefill", Behavior::NoPrefill),
        ("refuse-continuation", Behavior::RefuseContinuation),
        ("continue-overlap:2", Behavior::ContinueOverlap { words: 2 }),
    ];
    for (text, behavior) in forms {
        assert_eq!(text.parse::<Behavior>(), Ok(behavior.clone()), "{text}");
        assert_eq!(behavior.to_string(), text);
        assert_eq!(text.to_uppercase().parse::<Behavior>(), Ok(behavior));
    }
    for bad in [
        "stream-cut",
        "stream-cut:x",
        "stream-stall:-1",
        "stream-no-done:1",
        "stream-slow-start",
        "stream-async-filter:2",
        "stream",
    ] {
        let err = bad.parse::<Behavior>().expect_err(bad);
        assert!(err.contains("stream-slow-start:<ms>"), "{err}");
    }
}
