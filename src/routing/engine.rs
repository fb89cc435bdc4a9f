//! The Engine: what the routing policy needs, built once per execution environment (the pool,
//! the upstream client, the fleet sync, the clock and the settings), and the two ways of asking
//! it for an answer: whole, or streamed. Each lends the policy ([`Failover`]) what it borrows.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics_cloudwatch_embedded::Collector;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;

use aws_config::SdkConfig;

use crate::attempt::Answer;
use crate::clock::Clock;
use crate::health::Fleet;
use crate::net::Http;
use crate::outcome::{Document, JsonBody};
use crate::pool::{Pool, Route};
use crate::telemetry;
use crate::upstream::{Chat, Embeddings, Kind, Responses, StoredOp, Streaming, Upstream};

use super::failover::{Failover, RouteError};
use super::relay::{self, Delivery, Relay, Streamed};
use super::settings::Settings;
use super::state::{Conversations, StateError};
use super::sync::{FleetSync, Writes};

/// The stored response a Responses request continues, when it names one.
fn previous_response(body: &JsonBody) -> Option<&str> {
    body.get("previous_response_id")
        .and_then(serde_json::Value::as_str)
}

/// The routing policy's parts. Built once per execution environment.
pub struct Engine<C: Clock> {
    pool: Pool,
    upstream: Upstream,
    sync: FleetSync<C>,
    clock: C,
    settings: Settings,
    /// Where EMF metrics are collected, once installed (tests usually run without).
    metrics: OnceLock<&'static Collector>,
}

impl<C: Clock> Engine<C> {
    /// Prepares each deployment's calls over `http` and its health; `seed` seeds the weighted
    /// random choice; `fleet` shares health with the rest of the fleet; `aws` reaches STS for
    /// deployments that authenticate with Entra ID through the function's AWS role.
    pub fn new(
        pool: Pool,
        http: &Http,
        settings: Settings,
        clock: C,
        seed: u64,
        fleet: Option<Fleet>,
        aws: Option<&SdkConfig>,
    ) -> Self {
        Self {
            upstream: Upstream::new(&pool, http, aws),
            sync: FleetSync::new(&pool.deployments, &settings, clock.clone(), seed, fleet),
            pool,
            clock,
            settings,
            metrics: OnceLock::new(),
        }
    }

    /// Before the first request: what the fleet already knows, the table's connection made,
    /// and an Entra ID token for each app the pool authenticates with, at the same time.
    pub async fn warm_up(&self) {
        let (_, tokens) = tokio::join!(self.sync.warm_up(), self.upstream.tokens(&self.clock));
        for error in tokens.into_iter().filter_map(Result::err) {
            tracing::warn!(%error, "no Entra ID token at cold start: requests will ask again");
        }
    }

    /// Whether a token can be had for every app the pool authenticates with (`--check`).
    pub async fn check_tokens(&self) -> Vec<Result<(), crate::upstream::TokenError>> {
        self.upstream.tokens(&self.clock).await
    }

    /// Flushes EMF metrics to stdout when a stream this engine relays ends.
    pub fn flush_metrics_to(&self, collector: &'static Collector) {
        // Set once, at start-up; a second call changes nothing.
        let _ = self.metrics.set(collector);
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The policy, lent what it acts on.
    fn failover(&self) -> Failover<'_, C> {
        Failover {
            pool: &self.pool,
            upstream: &self.upstream,
            sync: &self.sync,
            clock: &self.clock,
            settings: &self.settings,
        }
    }

    /// Asks the route's deployments for a whole chat completion until one answers, before
    /// `deadline`.
    pub async fn complete(
        &self,
        route: &Route,
        body: &JsonBody,
        deadline: Instant,
    ) -> Result<Answer<<Chat as Kind>::Answer>, RouteError> {
        self.whole::<Chat>(route, body, deadline).await
    }

    /// Asks the route's deployments for embeddings until one answers, before `deadline`.
    pub async fn embed(
        &self,
        route: &Route,
        body: &JsonBody,
        deadline: Instant,
    ) -> Result<Answer<Document>, RouteError> {
        self.whole::<Embeddings>(route, body, deadline).await
    }

    /// A response (not streamed) from the route's deployments, before `deadline`: one that
    /// continues a stored conversation only from the deployments on the resource that stores
    /// it (`routing::state`); a stored one remembered fleet-wide.
    pub async fn respond(
        &self,
        route: &Route,
        body: &JsonBody,
        deadline: Instant,
    ) -> Result<Answer<Document>, StateError> {
        let state = self.conversations();
        let answer = match previous_response(body) {
            None => self
                .whole::<Responses>(route, body, deadline)
                .await
                .map_err(StateError::Route)?,
            Some(id) => {
                let (holder, pinned) = state.holding(route, id, deadline).await?;
                self.whole::<Responses>(&pinned, body, deadline)
                    .await
                    .map_err(|error| state.held(id, holder, error))?
            }
        };
        state.remember(body, &answer).await;
        Ok(answer)
    }

    /// A streamed response ([`Engine::respond`], relayed as chat streams are: the preamble
    /// held until the first output, a cut stream continued or ended honestly); a stored one is
    /// remembered as soon as its id is known.
    pub async fn stream_response(
        self: &Arc<Self>,
        route: &Route,
        body: &JsonBody,
        deadline: Instant,
        delivery: Delivery,
    ) -> Result<Answer<Streamed>, StateError> {
        match previous_response(body) {
            None => self
                .stream_of::<Responses>(route, body, deadline, delivery)
                .await
                .map_err(StateError::Route),
            Some(id) => {
                let state = self.conversations();
                let (holder, pinned) = state.holding(route, id, deadline).await?;
                self.stream_of::<Responses>(&pinned, body, deadline, delivery)
                    .await
                    .map_err(|error| state.held(id, holder, error))
            }
        }
    }

    /// `op` on stored response `id`, where it is stored, before `deadline`; `query` is the
    /// caller's, passed on.
    pub async fn stored(
        &self,
        op: StoredOp,
        id: &str,
        query: Option<&str>,
        deadline: Instant,
    ) -> Result<Answer<Document>, StateError> {
        self.conversations().stored(op, id, query, deadline).await
    }

    fn conversations(&self) -> Conversations<'_, C> {
        Conversations {
            policy: self.failover(),
        }
    }

    /// A whole answer of kind `K`; the request's table writes finished before it returns.
    async fn whole<K: Kind>(
        &self,
        route: &Route,
        body: &JsonBody,
        deadline: Instant,
    ) -> Result<Answer<K::Answer>, RouteError> {
        let mut writes = Writes::default();
        let result = self
            .failover()
            .whole::<K>(route, body, deadline, &mut writes)
            .await;
        self.sync.finish(writes).await;
        let answer = result?;
        telemetry::answered(&answer.deployment, K::tokens(&answer.output));
        Ok(answer)
    }

    /// A streamed chat completion ([`Engine::stream_of`]).
    pub async fn stream(
        self: &Arc<Self>,
        route: &Route,
        body: &JsonBody,
        deadline: Instant,
        delivery: Delivery,
    ) -> Result<Answer<Streamed>, RouteError> {
        self.stream_of::<Chat>(route, body, deadline, delivery)
            .await
    }

    /// Fails over until a deployment's stream produces content within the time-to-first-token
    /// limit, then relays it from a background task: the answer's output is the frames to send
    /// and, when the stream has ended, its report. Errors come back before any byte is sent.
    /// `delivery` says whether the caller sees frames as they come or only the whole answer.
    async fn stream_of<K: Streaming>(
        self: &Arc<Self>,
        route: &Route,
        body: &JsonBody,
        deadline: Instant,
        delivery: Delivery,
    ) -> Result<Answer<Streamed>, RouteError> {
        let mut writes = Writes::default();
        let opened = self
            .failover()
            .open::<K>(route, body, deadline, &[], &mut writes)
            .await;
        let (index, answer) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                self.sync.finish(writes).await;
                return Err(error);
            }
        };
        telemetry::answered(&answer.deployment, None);
        let Answer {
            route: route_name,
            deployment,
            output: opened,
            attempts,
        } = answer;
        let (out, report, streamed) = relay::channel(delivery);
        let engine = Arc::clone(self);
        let (route, body) = (route.clone(), body.clone());
        let run = async move {
            let relay = Relay::<C, K>::new(
                engine.failover(),
                route,
                body,
                deadline,
                out,
                report,
                writes,
            );
            relay.run(index, opened).await;
            telemetry::flush(engine.metrics.get().copied());
        };
        // The caller's span and log subscriber go with it, so its lines carry the request id.
        tokio::spawn(run.in_current_span().with_current_subscriber());
        Ok(Answer {
            route: route_name,
            deployment,
            output: streamed,
            attempts,
        })
    }
}
