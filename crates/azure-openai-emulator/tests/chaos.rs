//! Chaos over real HTTP: every call acts out the phase its seeded schedule has when it arrives.

mod common;

use std::time::Duration;

use azure_openai_emulator::chaos::ChaosKind;
use azure_openai_emulator::{Behavior, Chaos, Emulator};
use serde_json::{Value, json};

/// What a caller sees of one call.
#[derive(Debug, PartialEq)]
enum Seen {
    Answer { finish: String },
    Status(u16),
    NoResponse,
    Reset,
}

async fn call(emu: &Emulator, deployment: &str, stream: bool) -> Seen {
    let url = format!(
        "{}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21",
        emu.url()
    );
    let body = json!({"messages": [{"role": "user", "content": "one two three four five six"}],
                      "stream": stream});
    let sent = common::client()
        .post(url)
        .header("api-key", emu.api_key())
        .json(&body)
        .timeout(Duration::from_millis(400))
        .send()
        .await;
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) if e.is_timeout() => return Seen::NoResponse,
        Err(_) => return Seen::Reset,
    };
    let status = resp.status().as_u16();
    if status != 200 {
        return Seen::Status(status);
    }
    match resp.text().await {
        Err(e) if e.is_timeout() => Seen::NoResponse,
        Err(_) => Seen::Reset,
        Ok(text) if stream => {
            let finish = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .find_map(|e| e["choices"][0]["finish_reason"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let done = text.contains("data: [DONE]");
            Seen::Answer {
                finish: format!("{finish}{}", if done { "" } else { " no-done" }),
            }
        }
        Ok(text) => {
            let body: Value = serde_json::from_str(&text).expect("a JSON answer");
            Seen::Answer {
                finish: body["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            }
        }
    }
}

/// What a call of `behavior` must look like to its caller.
fn expected(behavior: &Behavior, stream: bool) -> Seen {
    let answer = |finish: &str| Seen::Answer {
        finish: finish.to_owned(),
    };
    match ChaosKind::of(behavior).expect("a chaos behaviour") {
        ChaosKind::Healthy | ChaosKind::StreamCorrupt => answer("stop"),
        ChaosKind::StreamCut | ChaosKind::StreamStall | ChaosKind::StreamNoDone if !stream => {
            answer("stop")
        }
        ChaosKind::StreamCut => Seen::Reset,
        ChaosKind::StreamStall => Seen::NoResponse,
        ChaosKind::StreamNoDone => answer("stop no-done"),
        ChaosKind::OutputFiltered => answer("content_filter"),
        ChaosKind::Throttled => Seen::Status(429),
        ChaosKind::ServerError => Seen::Status(500),
        ChaosKind::Unavailable => Seen::Status(503),
        ChaosKind::ContentFilter => Seen::Status(400),
        ChaosKind::Hang => Seen::NoResponse,
        ChaosKind::ResetConnection => Seen::Reset,
    }
}

#[tokio::test]
async fn each_call_acts_out_the_phase_in_force_when_it_arrived() {
    let chaos = Chaos::new(11, 30);
    let emu = Emulator::builder()
        .deployment("gpt-4o", Behavior::Chaos(chaos))
        .start()
        .await
        .expect("starts");
    let mut schedule = chaos.schedule("gpt-4o");
    let mut seen = Vec::new();
    while emu.elapsed() < Duration::from_secs(4) {
        let stream = seen.len() % 2 == 1;
        seen.push((stream, call(&emu, "gpt-4o", stream).await));
    }
    let arrived = emu.call_times("gpt-4o");
    assert_eq!(arrived.len(), seen.len());
    let mut phases = std::collections::BTreeSet::new();
    for ((stream, seen), at) in seen.iter().zip(arrived) {
        let phase = schedule.at(at).clone();
        assert_eq!(
            *seen,
            expected(&phase.behavior, *stream),
            "a call at {at:?} (stream: {stream}) in {phase:?}"
        );
        phases.insert(phase.start);
    }
    // Four seconds span more than one phase of at most three.
    assert!(phases.len() >= 2, "{phases:?}");
}

#[tokio::test]
async fn a_new_chaos_replaces_the_old_schedule_and_one_shot_behaviours_still_come_first() {
    let emu = Emulator::builder()
        .deployment("gpt-4o", Behavior::Chaos(Chaos::new(3, 0)))
        .start()
        .await
        .expect("starts");
    emu.push("gpt-4o", Behavior::ServerError);
    assert_eq!(call(&emu, "gpt-4o", false).await, Seen::Status(500));
    emu.set("gpt-4o", Behavior::Chaos(Chaos::new(3, 100)));
    for _ in 0..5 {
        assert_eq!(
            call(&emu, "gpt-4o", true).await,
            Seen::Answer {
                finish: "stop".into()
            }
        );
    }
}
