//! The deployment pool: every deployment the function may call, where it lives, how to reach it,
//! and the named routes that map a requested model to its deployments. Built once at cold start
//! (`config::pool` reads it from `FALLBACK_POOL` or the simple variables).

use crate::secret::Secret;

/// How a deployment is addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiStyle {
    /// `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=V`, `api-key` header.
    Classic { api_version: String },
    /// The OpenAI wire format: deployment (model) in the body, `Authorization: Bearer`.
    /// Azure's `/openai/v1`, or any OpenAI-compatible server (vLLM, Ollama, llama.cpp).
    V1,
}

#[derive(Debug, Clone)]
pub struct Deployment {
    /// Unique name in logs, headers and the 503 body.
    pub id: String,
    /// Resource (or server) base URL, without a trailing slash.
    pub endpoint: String,
    /// The deployment name on that resource (the `model` for v1 servers).
    pub deployment: String,
    /// `None` only for v1 servers that take no key (a local Ollama, say).
    pub key: Option<Secret>,
    /// The variable the key was read from, for messages about it.
    pub key_var: String,
    pub api: ApiStyle,
    /// Lower is tried first; equal priorities share load by weight.
    pub priority: u32,
    pub weight: f64,
    /// Context window in tokens, when known: steers requests that were too long elsewhere.
    pub context_window: Option<u32>,
    /// What the deployment's model does.
    pub serves: Serves,
    /// How the deployment is told who calls it: its key, or an Entra ID token.
    pub auth: Auth,
}

/// How a deployment authenticates its caller.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    /// Its key: `api-key` on classic URLs, `Authorization: Bearer` on v1.
    #[default]
    Key,
    /// A Microsoft Entra ID access token for an app registration, as `Authorization: Bearer`;
    /// never an `api-key` (a resource with `disableLocalAuth` refuses every key).
    Entra(EntraApp),
}

/// An app registration in Microsoft Entra ID, and how the function proves it is that app.
#[derive(Debug, Clone)]
pub struct EntraApp {
    /// The authority host, `https://login.microsoftonline.com` unless `AZURE_AUTHORITY_HOST`
    /// (or the entry) names a sovereign cloud's.
    pub authority: String,
    pub tenant: String,
    pub client_id: String,
    /// `https://cognitiveservices.azure.com/.default` unless configured.
    pub scope: String,
    pub credential: EntraCredential,
}

impl EntraApp {
    /// Deployments whose apps agree on this share one token.
    pub fn cache_key(&self) -> (String, String, String, String) {
        (
            self.authority.clone(),
            self.tenant.clone(),
            self.client_id.clone(),
            self.scope.clone(),
        )
    }
}

/// How the function proves to Entra ID that it is the app.
#[derive(Debug, Clone)]
pub enum EntraCredential {
    /// The function's own AWS role: a web identity token from STS (`GetWebIdentityToken`, for
    /// `audience`), presented as the client assertion of a federated credential. No secret.
    AwsFederation { audience: String },
    /// A client secret, from the variable `var` (its value, or a reference resolved at cold
    /// start).
    ClientSecret { secret: Secret, var: String },
}

/// What a deployment's model does: generate (chat completions and the Responses API), or embed.
/// A route's members all serve the same, so that failing over never changes what kind of answer
/// (or which vector space) the caller gets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Serves {
    #[default]
    Generation,
    /// Embeddings of `model` with `dimensions` numbers per vector: deployments fail over to
    /// each other only when both agree, since vectors of different models are not comparable.
    Embeddings { model: String, dimensions: u32 },
}

impl Serves {
    /// As error messages name it.
    pub fn describe(&self) -> String {
        match self {
            Serves::Generation => "chat completions and responses".into(),
            Serves::Embeddings { model, dimensions } => {
                format!("embeddings ({model}, {dimensions} dimensions)")
            }
        }
    }
}

impl Deployment {
    /// The URL of operation `path` (`chat/completions`, ...) on this deployment: classic
    /// `{endpoint}/openai/deployments/{deployment}/{path}?api-version=V`, or the v1 shape.
    pub fn url(&self, path: &str) -> String {
        match &self.api {
            ApiStyle::Classic { api_version } => format!(
                "{}/openai/deployments/{}/{path}?api-version={api_version}",
                self.endpoint, self.deployment
            ),
            ApiStyle::V1 => self.v1_url(path),
        }
    }

    /// The URL of operation `path` on the resource's v1 API, whatever the entry's style: what
    /// only v1 serves (the Responses API) is called there, with the entry's key.
    pub fn v1_url(&self, path: &str) -> String {
        // An OpenAI-compatible base URL already ends in /v1; an Azure resource URL does not.
        if self.endpoint.ends_with("/v1") {
            format!("{}/{path}", self.endpoint)
        } else {
            format!("{}/openai/v1/{path}", self.endpoint)
        }
    }

    /// The name sent as the body's `model`: v1 servers take the deployment there (classic URLs
    /// carry it in the path).
    pub fn model(&self) -> Option<&str> {
        match self.api {
            ApiStyle::Classic { .. } => None,
            ApiStyle::V1 => Some(&self.deployment),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Indexes into [`Pool::deployments`].
    pub members: Vec<usize>,
    /// What every member serves (the configuration checks they agree).
    pub serves: Serves,
    /// Members reporting fewer remaining tokens than this are kept out (a batch client's
    /// request: the rest is kept for interactive ones). `None` for the configured routes.
    pub reserve: Option<u64>,
}

impl Route {
    /// This route for a request that keeps off deployments with fewer than `tokens` left.
    pub fn keeping(&self, tokens: u64) -> Route {
        Route {
            reserve: Some(tokens),
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub deployments: Vec<Deployment>,
    pub routes: Vec<Route>,
    /// Index into `routes` of the route GET /?query= uses.
    pub default_route: usize,
    /// No routes were named: every requested model is served by the one route.
    pub open_routes: bool,
}

impl Pool {
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.name == name)
    }

    pub fn default_route(&self) -> &Route {
        &self.routes[self.default_route]
    }
}
