//! Embeddings: deterministic unit vectors, the same for the same model and input on every
//! deployment (as two deployments of one model give), of the model's dimension or the request's
//! `dimensions`; `encoding_format: "base64"` (what the openai Python SDK asks for) as
//! little-endian f32s.

use std::hash::{DefaultHasher, Hash, Hasher};

use axum::http::StatusCode;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::wire::{Reply, bad_request};

/// The largest vector the emulator makes (text-embedding-3-large's).
const MAX_DIMENSIONS: u64 = 3072;

/// The dimension Azure's embedding models give by default.
pub(crate) fn default_dimensions(model: &str) -> u64 {
    if model.contains("3-large") {
        3072
    } else {
        1536
    }
}

/// The texts (or token lists) to embed, or Azure's 400 for what is not one.
pub(crate) fn inputs(body: Option<&Value>) -> Result<Vec<String>, Reply> {
    let Some(body) = body else {
        return Err(bad_request(
            "We could not parse the JSON body of your request.",
            "input",
        ));
    };
    let invalid = || bad_request("'input' is invalid", "input");
    match body.get("input") {
        None | Some(Value::Null) => Err(bad_request("'input' is a required property", "input")),
        Some(Value::String(text)) if !text.is_empty() => Ok(vec![text.clone()]),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_u64) {
                return Ok(vec![Value::Array(items.clone()).to_string()]);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) if !text.is_empty() => Ok(text.clone()),
                    Value::Array(tokens) if !tokens.is_empty() => Ok(item.to_string()),
                    _ => Err(invalid()),
                })
                .collect()
        }
        Some(_) => Err(invalid()),
    }
}

/// The 200 `list` of one vector per input.
pub(crate) fn reply(
    model: &str,
    body: &Value,
    inputs: &[String],
    remaining_requests: u64,
    remaining_tokens: u64,
) -> Reply {
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => default_dimensions(model),
        Some(d) => match d.as_u64() {
            Some(d) if (1..=MAX_DIMENSIONS).contains(&d) => d,
            _ => return bad_request("'dimensions' is invalid", "dimensions"),
        },
    };
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = vector(model, input, dimensions as usize);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = inputs
        .iter()
        .map(|i| i.split_whitespace().count().max(1) as u64)
        .sum();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Reply {
        status: StatusCode::OK,
        headers: vec![
            (
                "x-ratelimit-remaining-requests",
                remaining_requests.to_string(),
            ),
            ("x-ratelimit-remaining-tokens", remaining_tokens.to_string()),
        ],
        body: body.to_string(),
    }
}

/// A unit vector drawn from a generator seeded by the model and the input.
fn vector(model: &str, input: &str, dimensions: usize) -> Vec<f32> {
    let mut hasher = DefaultHasher::new();
    (model, input).hash(&mut hasher);
    let mut state = hasher.finish() | 1;
    let mut v: Vec<f32> = (0..dimensions)
        .map(|_| {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let x = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_unit_length_deterministic_and_per_model() {
        let a = vector("text-embedding-3-small", "hello", 8);
        assert_eq!(a, vector("text-embedding-3-small", "hello", 8));
        assert_ne!(a, vector("text-embedding-3-large", "hello", 8));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }

    #[test]
    fn inputs_are_strings_or_token_lists_and_never_empty() {
        let of = |v: Value| inputs(Some(&json!({"input": v})));
        assert_eq!(of(json!("a")).unwrap(), ["a"]);
        assert_eq!(of(json!(["a", "b"])).unwrap().len(), 2);
        assert_eq!(of(json!([1, 2])).unwrap().len(), 1);
        assert_eq!(of(json!([[1], [2]])).unwrap().len(), 2);
        for bad in [json!(""), json!([]), json!([""]), json!(3), json!([{}])] {
            assert!(of(bad).is_err());
        }
        assert!(inputs(Some(&json!({}))).is_err());
    }
}
