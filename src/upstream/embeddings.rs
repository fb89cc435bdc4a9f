//! Embeddings: `embeddings` on each deployment (classic
//! `/openai/deployments/{d}/embeddings?api-version=`, or v1 `/openai/v1/embeddings` with the
//! deployment as `model`), a `list` of vectors passed through as sent. Never streamed; the pool
//! lets a route fail over only between deployments of one embedding model and dimension.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::outcome::{Document, Failure, Transient, total_tokens};
use crate::pool::Deployment;

use super::kind::{Kind, KindId};

/// `POST .../embeddings`.
pub struct Embeddings;

impl Kind for Embeddings {
    const ID: KindId = KindId::Embeddings;
    type Answer = Document;

    fn url(d: &Deployment) -> String {
        d.url("embeddings")
    }

    /// A list with at least one vector; anything else from a 2xx is not an answer.
    fn answer(body: Bytes) -> Result<Document, Failure> {
        #[derive(Deserialize)]
        struct Wire {
            data: Vec<Value>,
            usage: Option<Value>,
        }
        match serde_json::from_slice::<Wire>(&body) {
            Ok(wire) if !wire.data.is_empty() => Ok(Document {
                tokens: total_tokens(wire.usage.as_ref()),
                id: None,
                raw: body,
            }),
            _ => Err(Failure::Transient(Transient::BadResponse)),
        }
    }

    fn tokens(answer: &Document) -> Option<u64> {
        answer.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::ApiStyle;

    #[test]
    fn a_list_of_vectors_is_an_answer_and_anything_else_is_not() {
        let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":2,"total_tokens":2}}"#;
        let answer = Embeddings::answer(Bytes::from_static(body)).unwrap();
        assert_eq!(answer.tokens, Some(2));
        assert_eq!(&answer.raw[..], &body[..]);
        for bad in [&br#"{"data":[]}"#[..], b"{}", b"<html>"] {
            assert!(matches!(
                Embeddings::answer(Bytes::copy_from_slice(bad)),
                Err(Failure::Transient(Transient::BadResponse))
            ));
        }
    }

    #[test]
    fn classic_and_v1_deployments_are_called_where_azure_serves_embeddings() {
        let mut d = Deployment {
            id: "e".into(),
            endpoint: "https://r.openai.azure.com".into(),
            deployment: "te3".into(),
            key: None,
            key_var: "K".into(),
            api: ApiStyle::Classic {
                api_version: "2024-10-21".into(),
            },
            priority: 0,
            weight: 1.0,
            context_window: None,
            serves: Default::default(),
            auth: Default::default(),
        };
        assert_eq!(
            Embeddings::url(&d),
            "https://r.openai.azure.com/openai/deployments/te3/embeddings?api-version=2024-10-21"
        );
        assert_eq!(Embeddings::model(&d), None);
        d.api = ApiStyle::V1;
        assert_eq!(
            Embeddings::url(&d),
            "https://r.openai.azure.com/openai/v1/embeddings"
        );
        assert_eq!(Embeddings::model(&d), Some("te3"));
    }
}
