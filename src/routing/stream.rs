//! Streamed chat completions: fail over until a deployment's stream has produced its first
//! content, then relay it from a background task (`relay`), which rescues a stream cut after
//! that by continuing the answer on another deployment.

use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;
use tracing::instrument::WithSubscriber;

use crate::attempt::Answer;
use crate::clock::Clock;
use crate::outcome::ChatBody;
use crate::pool::Route;
use crate::telemetry;
use crate::upstream::Opened;

use super::engine::{Engine, RouteError};
use super::link::Writes;
use super::relay::{Delivery, Relay, Streamed};

impl<C: Clock> Engine<C> {
    /// Fails over until a deployment's stream produces content within the time-to-first-token
    /// limit, then relays it from a background task: the answer's output is the frames to send
    /// and, when the stream has ended, its report. Errors come back before any byte is sent.
    /// `delivery` says whether the caller sees frames as they come or only the whole answer.
    pub async fn stream(
        self: &Arc<Self>,
        route: &Route,
        body: &ChatBody,
        deadline: Instant,
        delivery: Delivery,
    ) -> Result<Answer<Streamed>, RouteError> {
        let mut writes = Writes::default();
        let opened = self.open(route, body, deadline, &[], &mut writes).await;
        let (index, answer) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                self.finish(writes).await;
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
        let (relay, streamed) = Relay::new(
            Arc::clone(self),
            route.clone(),
            body.clone(),
            deadline,
            delivery,
            writes,
        );
        // The caller's span and log subscriber go with it, so its lines carry the request id.
        let run = relay
            .run(index, opened)
            .in_current_span()
            .with_current_subscriber();
        tokio::spawn(run);
        Ok(Answer {
            route: route_name,
            deployment,
            output: streamed,
            attempts,
        })
    }

    /// The failover loop for a stream: a deployment of `route` (none in `exclude`) whose
    /// stream for `body` has produced its first content.
    pub(super) async fn open(
        &self,
        route: &Route,
        body: &ChatBody,
        deadline: Instant,
        exclude: &[usize],
        writes: &mut Writes,
    ) -> Result<(usize, Answer<Opened>), RouteError> {
        let first_token = self.settings.first_token_timeout;
        self.failover(route, deadline, exclude, writes, |index, timeout| {
            self.upstream
                .open_stream(&self.clock, index, body, timeout, first_token)
        })
        .await
    }
}
