//! Who may call the function: the client keys, checked in constant time, unless something in
//! front of the function (IAM auth on the Function URL, an API Gateway authorizer) already did.

use lambda_http::http::HeaderMap;
use lambda_http::http::header::AUTHORIZATION;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config::Config;
use crate::error::ConfigError;

/// Shorter keys are guessable; OpenAI's own are far longer.
pub const MIN_KEY_CHARS: usize = 16;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Missing client key: send it as 'Authorization: Bearer <key>' or 'api-key: <key>'.")]
    Missing,
    #[error("Invalid client key.")]
    Invalid,
}

/// Who a request comes from, once its key matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A key of `CLIENT_API_KEYS`, or anyone when keys are checked in front: no limits.
    Unnamed,
    /// Named client number `.0` of `config.clients`.
    Client(usize),
}

/// The accepted client keys: `CLIENT_API_KEYS` and the named clients' keys. Empty when callers
/// are authenticated in front of the function.
pub struct ClientKeys {
    /// Each key, and whose it is (0: `CLIENT_API_KEYS`, n: named client n - 1).
    keys: Vec<(Vec<u8>, u32)>,
}

impl ClientKeys {
    /// Reads `CLIENT_API_KEYS` (after any Secrets Manager or SSM reference was resolved): keys
    /// separated by commas or newlines; and each named client's keys. Every key is at least
    /// [`MIN_KEY_CHARS`] long and belongs to one caller only.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mut keys: Vec<(Vec<u8>, u32)> = Vec::new();
        if let Some(raw) = &config.client_keys {
            let plain: Vec<&str> = raw
                .expose()
                .split([',', '\n'])
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .collect();
            if plain.is_empty() {
                return Err(ConfigError::Invalid {
                    var: "CLIENT_API_KEYS",
                    reason: "holds no key".into(),
                });
            }
            if let Some(position) = plain.iter().position(|k| k.chars().count() < MIN_KEY_CHARS) {
                return Err(ConfigError::Invalid {
                    var: "CLIENT_API_KEYS",
                    reason: format!(
                        "key number {} is shorter than {MIN_KEY_CHARS} characters; generate one with `openssl rand -hex 24`",
                        position + 1
                    ),
                });
            }
            keys.extend(plain.iter().map(|k| (k.as_bytes().to_vec(), 0)));
        }
        for (i, client) in config.clients.iter().enumerate() {
            for (key, var) in client.keys.iter().zip(&client.key_vars) {
                let key = key.expose().trim();
                if key.chars().count() < MIN_KEY_CHARS {
                    return Err(ConfigError::InvalidKey {
                        var: var.clone(),
                        reason: format!(
                            "the key of client {:?} is shorter than {MIN_KEY_CHARS} characters; generate one with `openssl rand -hex 24`",
                            client.name
                        ),
                    });
                }
                if keys.iter().any(|(k, _)| k == key.as_bytes()) {
                    return Err(ConfigError::InvalidKey {
                        var: var.clone(),
                        reason: format!(
                            "the key of client {:?} is also another caller's key: each key names one caller",
                            client.name
                        ),
                    });
                }
                keys.push((key.as_bytes().to_vec(), i as u32 + 1));
            }
        }
        Ok(Self { keys })
    }

    /// Whether keys are checked at all.
    pub fn enforced(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks the key a request presents, as OpenAI clients send it (`Authorization: Bearer`)
    /// or as Azure clients do (`api-key`), and says whose it is.
    pub fn check(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        if !self.enforced() {
            return Ok(Caller::Unnamed);
        }
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim());
        let presented = bearer
            .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()))
            .filter(|k| !k.is_empty())
            .ok_or(Refusal::Missing)?;
        // Compare with every key, without stopping at a match, so timing says nothing of which.
        let (matched, owner) = self.keys.iter().fold(
            (subtle::Choice::from(0), 0u32),
            |(found, owner), (key, whose)| {
                let same = key.as_slice().ct_eq(presented.as_bytes());
                (found | same, u32::conditional_select(&owner, whose, same))
            },
        );
        match (bool::from(matched), owner) {
            (false, _) => Err(Refusal::Invalid),
            (true, 0) => Ok(Caller::Unnamed),
            (true, n) => Ok(Caller::Client(n as usize - 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lambda_http::http::HeaderValue;

    fn keys(raw: &str) -> Result<ClientKeys, ConfigError> {
        let vars = [
            ("AZURE_OPENAI_ENDPOINT", "https://x.openai.azure.com"),
            ("AZURE_OPENAI_API_KEY", "k"),
            ("CLIENT_API_KEYS", raw),
        ];
        let config = Config::from_lookup(|n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        ClientKeys::from_config(&config)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    lambda_http::http::HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    const A: &str = "fc-0123456789abcdef";
    const B: &str = "fc-fedcba9876543210";

    #[test]
    fn either_header_form_with_any_configured_key_is_accepted() {
        let k = keys(&format!("{A}, {B}\n")).unwrap();
        assert_eq!(
            k.check(&headers(&[("authorization", &format!("Bearer {A}"))])),
            Ok(Caller::Unnamed)
        );
        assert_eq!(
            k.check(&headers(&[("authorization", &format!("bearer {B}"))])),
            Ok(Caller::Unnamed)
        );
        assert_eq!(k.check(&headers(&[("api-key", B)])), Ok(Caller::Unnamed));
    }

    #[test]
    fn a_missing_or_wrong_key_is_refused() {
        let k = keys(A).unwrap();
        assert_eq!(k.check(&headers(&[])), Err(Refusal::Missing));
        assert_eq!(
            k.check(&headers(&[("authorization", "Basic abc")])),
            Err(Refusal::Missing)
        );
        assert_eq!(k.check(&headers(&[("api-key", "")])), Err(Refusal::Missing));
        assert_eq!(k.check(&headers(&[("api-key", B)])), Err(Refusal::Invalid));
        assert_eq!(
            k.check(&headers(&[("authorization", &format!("Bearer {A}x"))])),
            Err(Refusal::Invalid),
            "a longer key is not a match"
        );
        assert_eq!(
            k.check(&headers(&[(
                "authorization",
                &format!("Bearer {}", &A[..10])
            )])),
            Err(Refusal::Invalid),
            "nor is a prefix"
        );
    }

    #[test]
    fn short_or_empty_keys_stop_the_cold_start_without_showing_them() {
        let err = keys(&format!("{A},short-key")).err().unwrap().to_string();
        assert!(
            err.contains("key number 2") && err.contains("CLIENT_API_KEYS"),
            "{err}"
        );
        assert!(!err.contains("short-key") && !err.contains(A), "{err}");
        assert!(keys(" , ,").is_err());
    }
}
