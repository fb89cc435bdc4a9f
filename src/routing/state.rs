//! Stored responses: the Responses API keeps a response (`store` defaults to true) on the Azure
//! resource that made it, for 30 days, and only there can it be continued
//! (`previous_response_id`), read, listed or deleted. The fleet remembers which deployment made
//! each (in memory and in the health table, `FleetSync::pin`); an id it does not know is
//! looked up on the resources in order (the route's first), one `GET` per resource. A request
//! that carries state goes only to deployments of that resource, through the one failover
//! loop, so cooldowns, circuits and deadlines hold as for any call; when none can answer it is
//! refused with the resource's deployment named, never answered elsewhere without the history.
//! A request without stored state (`store: false`, no `previous_response_id`) fails over freely.

use std::time::{Duration, Instant};

use crate::attempt::{Answer, Attempt, Exhausted};
use crate::clock::Clock;
use crate::outcome::{Called, Document, Failure, JsonBody};
use crate::pool::{Route, Serves};
use crate::telemetry;
use crate::upstream::{StoredOp, stores};

use super::failover::Failover;
use super::failover::RouteError;
use super::sync::Writes;

/// Why a request about a stored response got no answer.
#[derive(Debug)]
pub enum StateError {
    /// No resource of the pool holds response `id` (every one was asked and said so).
    NotFound { id: String },
    /// Response `id` lives where `deployment` is, and nothing there can answer now.
    Unavailable {
        id: String,
        deployment: String,
        error: RouteError,
    },
    /// The requested route has no deployment on the resource of `deployment`, which holds `id`.
    Elsewhere {
        id: String,
        deployment: String,
        route: String,
    },
    /// Some resources could not be asked whether they hold `id`; it may be on one of them.
    Unknown { id: String, exhausted: Exhausted },
    /// A request without stored state that no deployment could answer.
    Route(RouteError),
}

impl StateError {
    /// The attempts it carries.
    pub fn attempts(&self) -> &[Attempt] {
        match self {
            StateError::Route(error) | StateError::Unavailable { error, .. } => match error {
                RouteError::ContentFiltered { attempts, .. } => attempts,
                RouteError::Unavailable(exhausted) => &exhausted.attempts,
            },
            StateError::Unknown { exhausted, .. } => &exhausted.attempts,
            StateError::NotFound { .. } | StateError::Elsewhere { .. } => &[],
        }
    }
}

/// What the Responses API's stored state needs of the policy, lent it for a request.
pub(super) struct Conversations<'a, C: Clock> {
    pub policy: Failover<'a, C>,
}

impl<C: Clock> Conversations<'_, C> {
    /// A stored answer's id is remembered with the deployment that made it.
    pub async fn remember(&self, body: &JsonBody, answer: &Answer<Document>) {
        if stores(body)
            && let Some(id) = &answer.output.id
            && let Some(index) = self.index_of(&answer.deployment)
        {
            self.policy.sync.pin(id, index).await;
        }
    }

    /// The deployment that holds response `id`, and `route` narrowed to the deployments on its
    /// resource.
    pub async fn holding(
        &self,
        route: &Route,
        id: &str,
        deadline: Instant,
    ) -> Result<(usize, Route), StateError> {
        let (holder, _) = self.locate(id, &route.members, deadline).await?;
        let here = self.beside(holder, &route.members);
        if here.is_empty() {
            return Err(StateError::Elsewhere {
                id: id.to_owned(),
                deployment: self.policy.pool.deployments[holder].id.clone(),
                route: route.name.clone(),
            });
        }
        let pinned = Route {
            name: route.name.clone(),
            members: here,
            serves: route.serves.clone(),
            reserve: route.reserve,
        };
        Ok((holder, pinned))
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
        let default = self.policy.pool.default_route().members.clone();
        let (holder, found) = self.locate(id, &default, deadline).await?;
        if let (StoredOp::Get, Some(found)) = (op, found) {
            // The lookup was the read.
            return Ok(found);
        }
        let here = self.beside(holder, &[]);
        let result = self
            .on_resource(&here, deadline, |index, timeout| {
                self.stored_call(op, index, id, query, timeout)
            })
            .await;
        let answer = result.map_err(|error| self.held(id, holder, error))?;
        if op == StoredOp::Delete {
            self.policy.sync.unpin(id).await;
        }
        Ok(answer)
    }

    /// The deployment that holds response `id`: the fleet's record, or else the first
    /// resource that has it, asked in order (`first`'s deployments before the rest of the
    /// pool's), one `GET` each; that `GET`'s answer comes along when one was made.
    async fn locate(
        &self,
        id: &str,
        first: &[usize],
        deadline: Instant,
    ) -> Result<(usize, Option<Answer<Document>>), StateError> {
        if let Some(index) = self.policy.sync.holder(id).await {
            return Ok((index, None));
        }
        let deployments = &self.policy.pool.deployments;
        let mut order: Vec<usize> = first.to_vec();
        order.extend((0..deployments.len()).filter(|i| !first.contains(i)));
        let mut asked: Vec<&str> = Vec::new();
        let mut failed: Option<Exhausted> = None;
        for index in order {
            let d = &deployments[index];
            if d.serves != Serves::Generation || asked.contains(&d.endpoint.as_str()) {
                continue;
            }
            asked.push(&d.endpoint);
            // Any deployment of the resource can read its stored responses: one that is cooling
            // down or out leaves the lookup to another.
            let here = self.beside(index, &[]);
            let get = self
                .on_resource(&here, deadline, |index, timeout| {
                    self.stored_call(StoredOp::Get, index, id, None, timeout)
                })
                .await;
            match get {
                Ok(answer) => {
                    let index = self.index_of(&answer.deployment).unwrap_or(index);
                    self.policy.sync.pin(id, index).await;
                    return Ok((index, Some(answer)));
                }
                Err(RouteError::Unavailable(exhausted)) if not_here(&exhausted) => {}
                Err(error) => {
                    // When to ask again: when the soonest of the resources that could not say
                    // recovers.
                    let wait = match &error {
                        RouteError::Unavailable(exhausted) => exhausted.retry_after,
                        RouteError::ContentFiltered { .. } => Duration::from_secs(1),
                    };
                    let exhausted = failed.get_or_insert_with(|| Exhausted {
                        route: "lookup".into(),
                        attempts: Vec::new(),
                        deployments: Vec::new(),
                        retry_after: wait,
                    });
                    exhausted.retry_after = exhausted.retry_after.min(wait);
                    exhausted.attempts.extend(error.into_attempts());
                }
            }
        }
        Err(match failed {
            Some(exhausted) => StateError::Unknown {
                id: id.to_owned(),
                exhausted,
            },
            None => StateError::NotFound { id: id.to_owned() },
        })
    }

    /// The deployments on `holder`'s resource (its state is theirs too), among `members` (all
    /// the pool's when empty), `holder` first.
    fn beside(&self, holder: usize, members: &[usize]) -> Vec<usize> {
        let deployments = &self.policy.pool.deployments;
        let endpoint = &deployments[holder].endpoint;
        let candidates: Vec<usize> = if members.is_empty() {
            (0..deployments.len()).collect()
        } else {
            members.to_vec()
        };
        let mut here: Vec<usize> = candidates
            .into_iter()
            .filter(|&i| {
                &deployments[i].endpoint == endpoint && deployments[i].serves == Serves::Generation
            })
            .collect();
        here.sort_by_key(|&i| i != holder);
        here
    }

    /// One call on a stored response, a 404 (gone, or never here) told apart from a fault:
    /// it says nothing about the deployment's health.
    async fn stored_call(
        &self,
        op: StoredOp,
        index: usize,
        id: &str,
        query: Option<&str>,
        timeout: Duration,
    ) -> Called<Document> {
        let mut called = self
            .policy
            .upstream
            .stored(self.policy.clock, index, op, id, query, timeout)
            .await;
        if called.status == Some(404) {
            called.result = Err(Failure::Rejected {
                code: "not_found".into(),
                message: format!("No response with id '{id}' is stored here."),
            });
        }
        called
    }

    /// One call on a resource's store through the deployments `here` (all on that resource),
    /// one at a time: the first that can be called answers for the resource, so a 404 from one
    /// is the resource's answer, and a deployment cooling down or failing leaves it to the next.
    async fn on_resource<F, Fut>(
        &self,
        here: &[usize],
        deadline: Instant,
        call: F,
    ) -> Result<Answer<Document>, RouteError>
    where
        F: Fn(usize, Duration) -> Fut,
        Fut: Future<Output = Called<Document>>,
    {
        let mut earlier = Vec::new();
        let mut last = None;
        for &index in here {
            match self.on(&[index], deadline, &call).await {
                Ok(mut answer) => {
                    earlier.append(&mut answer.attempts);
                    answer.attempts = earlier;
                    return Ok(answer);
                }
                Err(RouteError::Unavailable(mut exhausted)) => {
                    let here_not = not_here(&exhausted);
                    earlier.append(&mut exhausted.attempts);
                    if here_not {
                        exhausted.attempts = earlier;
                        return Err(RouteError::Unavailable(exhausted));
                    }
                    last = Some(exhausted);
                }
                Err(error) => return Err(error),
            }
        }
        let mut exhausted = last.unwrap_or_else(|| Exhausted {
            route: "responses".into(),
            attempts: Vec::new(),
            deployments: Vec::new(),
            retry_after: Duration::from_secs(1),
        });
        exhausted.attempts = earlier;
        Err(RouteError::Unavailable(exhausted))
    }

    /// The failover loop over `members` for one call, the request's table writes finished
    /// before it returns.
    async fn on<F, Fut>(
        &self,
        members: &[usize],
        deadline: Instant,
        call: F,
    ) -> Result<Answer<Document>, RouteError>
    where
        F: Fn(usize, Duration) -> Fut,
        Fut: Future<Output = Called<Document>>,
    {
        let route = Route {
            name: "responses".into(),
            members: members.to_vec(),
            serves: Serves::Generation,
            reserve: None,
        };
        let mut writes = Writes::default();
        let result = self
            .policy
            .run(&route, deadline, &[], &mut writes, call)
            .await
            .map(|(_, answer)| answer);
        self.policy.sync.finish(writes).await;
        if let Ok(answer) = &result {
            telemetry::answered(&answer.deployment, None);
        }
        result
    }

    /// A request about `id`, stored with `holder`, that got no answer there.
    pub fn held(&self, id: &str, holder: usize, error: RouteError) -> StateError {
        match &error {
            RouteError::Unavailable(exhausted) if not_here(exhausted) => {
                StateError::NotFound { id: id.to_owned() }
            }
            RouteError::Unavailable(exhausted) if exhausted.refusal().is_none() => {
                StateError::Unavailable {
                    id: id.to_owned(),
                    deployment: self.policy.pool.deployments[holder].id.clone(),
                    error,
                }
            }
            _ => StateError::Route(error),
        }
    }

    fn index_of(&self, deployment: &str) -> Option<usize> {
        self.policy
            .pool
            .deployments
            .iter()
            .position(|d| d.id == deployment)
    }
}

/// Every deployment called said it does not hold the response.
fn not_here(exhausted: &Exhausted) -> bool {
    exhausted
        .refusal()
        .is_some_and(|last| last.code.as_deref() == Some("not_found"))
}
