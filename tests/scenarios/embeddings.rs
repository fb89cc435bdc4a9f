//! Embeddings through the one engine: `/v1/embeddings`, `/openai/v1/embeddings` and the Azure
//! path, failing over only between deployments of one embedding model and dimension.

use crate::common;

use common::{Behavior, Emulator, Harness, RetryAfter};
use fallback_chat::config::Config;
use serde_json::{Value, json};

const KEY: &str = "emb-key";

/// One resource: chat gpt-4o, and two deployments of text-embedding-3-small (the primary
/// classic, the fallback v1).
async fn harness(primary: Behavior) -> Harness {
    let emulator = Emulator::builder()
        .api_key(KEY)
        .deployment("gpt-4o", Behavior::Healthy)
        .deployment("te3-east", primary)
        .model_version("te3-east", "text-embedding-3-small")
        .deployment("te3-west", Behavior::Healthy)
        .model_version("te3-west", "text-embedding-3-small")
        .start()
        .await
        .unwrap();
    let small = json!({"model": "text-embedding-3-small", "dimensions": 1536});
    let pool = json!({
        "deployments": [
            {"id": "chat", "endpoint": emulator.url(), "deployment": "gpt-4o", "key_env": "K"},
            {"id": "east", "endpoint": emulator.url(), "deployment": "te3-east", "key_env": "K", "embeddings": small, "priority": 0},
            {"id": "west", "endpoint": emulator.url(), "deployment": "te3-west", "key_env": "K", "embeddings": small, "api": "v1", "priority": 1}
        ],
        "routes": {"gpt-4o": ["chat"], "text-embedding-3-small": ["east", "west"]},
        "default_route": "gpt-4o"
    });
    let vars = [
        ("FALLBACK_POOL".to_string(), pool.to_string()),
        ("K".to_string(), KEY.to_string()),
    ];
    Harness::build(emulator, Vec::new(), &vars, None)
}

fn vectors(body: &Value) -> Vec<&Vec<Value>> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["embedding"].as_array().unwrap())
        .collect()
}

#[tokio::test]
async fn a_throttled_primary_is_invisible_and_the_fallbacks_vectors_have_the_same_dimension() {
    let h = harness(Behavior::Throttled(RetryAfter::Seconds(7))).await;
    let sent = json!({
        "model": "text-embedding-3-small",
        "input": ["How do I reset my password?", "Where is my order?"],
        "x_vendor_field": {"kept": true}
    });
    let reply = h.post("/v1/embeddings", &sent).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["object"], "list");
    assert_eq!(reply.header("x-fallback-deployment"), Some("west"));
    assert_eq!(reply.header("x-fallback-attempts"), Some("2"));
    let vectors = vectors(&reply.body);
    assert_eq!(vectors.len(), 2);
    assert!(vectors.iter().all(|v| v.len() == 1536));
    assert!(reply.body["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Classic: the deployment in the path, the body as sent; v1: its name as `model`.
    let east = &h.emulator.requests("te3-east")[0];
    assert_eq!(east.path, "/openai/deployments/te3-east/embeddings");
    assert_eq!(east.body, sent);
    let west = &h.emulator.requests("te3-west")[0];
    assert_eq!(west.path, "/openai/v1/embeddings");
    assert_eq!(west.body["model"], "te3-west");
    assert_eq!(west.body["x_vendor_field"], sent["x_vendor_field"]);

    // The cooldown is shared with chat's machinery: the next request goes straight to west.
    let reply = h
        .post(
            "/openai/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": "hi"}),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(h.calls("te3-east"), 1, "east is cooling down");
    let line = h
        .logs
        .lines()
        .into_iter()
        .rev()
        .find(|l| l["fields"]["message"] == "request");
    let line = line.expect("a summary line");
    assert_eq!(line["fields"]["operation"], "embeddings");
    assert_eq!(line["fields"]["deployment"], "west");
}

#[tokio::test]
async fn the_azure_path_names_the_route_and_dimensions_and_base64_pass_through() {
    let h = harness(Behavior::Healthy).await;
    let sent = json!({"input": "hello", "dimensions": 256, "encoding_format": "base64"});
    let reply = h
        .post(
            "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21",
            &sent,
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.header("x-fallback-deployment"), Some("east"));
    let encoded = reply.body["data"][0]["embedding"].as_str().unwrap();
    // 256 little-endian f32s, base64: 1024 bytes, 1368 characters.
    assert_eq!(encoded.len(), 1368);
    assert_eq!(h.emulator.requests("te3-east")[0].body, sent);
}

#[tokio::test]
async fn bad_embedding_requests_get_a_clear_4xx_and_cost_nothing_upstream() {
    let h = harness(Behavior::Healthy).await;
    let cases = [
        (
            json!({"model": "text-embedding-3-small"}),
            400,
            "missing_required_parameter",
        ),
        (
            json!({"model": "text-embedding-3-small", "input": ""}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "text-embedding-3-small", "input": []}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "text-embedding-3-small", "input": [{"a": 1}]}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "text-embedding-3-small", "input": "x", "dimensions": 0}),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "nope", "input": "x"}),
            404,
            "model_not_found",
        ),
        // A chat route cannot embed, nor an embeddings route chat.
        (
            json!({"model": "gpt-4o", "input": "x"}),
            400,
            "operation_not_supported",
        ),
    ];
    for (body, status, code) in cases {
        let reply = h.post("/v1/embeddings", &body).await;
        assert_eq!(reply.status, status, "{body}: {:?}", reply.body);
        assert_eq!(reply.body["error"]["code"], code, "{body}");
    }
    let chat =
        json!({"model": "text-embedding-3-small", "messages": [{"role": "user", "content": "hi"}]});
    let reply = h.post("/v1/chat/completions", &chat).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "operation_not_supported");
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("embeddings (text-embedding-3-small, 1536 dimensions)"),
        "{:?}",
        reply.body
    );
    // A model no route serves, on the Responses API too (this pool names its routes).
    let reply = h
        .post("/v1/responses", &json!({"model": "nope", "input": "x"}))
        .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body["error"]["code"], "model_not_found");
    assert_eq!(h.emulator.total_calls(), 0);
}

#[test]
fn a_route_that_mixes_embedding_models_or_dimensions_is_refused_at_cold_start() {
    let pool = json!({
        "deployments": [
            {"id": "small", "endpoint": "https://a.openai.azure.com", "deployment": "s", "embeddings": {"model": "text-embedding-3-small", "dimensions": 1536}},
            {"id": "large", "endpoint": "https://a.openai.azure.com", "deployment": "l", "embeddings": {"model": "text-embedding-3-large", "dimensions": 3072}},
            {"id": "chat", "endpoint": "https://a.openai.azure.com", "deployment": "gpt-4o"}
        ],
        "routes": {"vectors": ["small", "large"], "chat": ["chat"]},
        "default_route": "chat"
    })
    .to_string();
    let vars = [
        ("FALLBACK_POOL", pool.as_str()),
        ("AZURE_OPENAI_API_KEY", "k"),
    ];
    let Err(error) = Config::from_lookup(|k| {
        vars.iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
    }) else {
        panic!("a route mixing embedding models is refused");
    };
    let error = error.to_string();
    assert!(error.contains("routes.vectors mixes \"small\""), "{error}");
    assert!(
        error.contains(
            "\"large\", which serves embeddings (text-embedding-3-large, 3072 dimensions)"
        ),
        "{error}"
    );
}
