//! The fleet's shared memory, in DynamoDB: one item (`pk = "deployments"`) with a few
//! attributes per deployment (`<host>/<deployment>|<field>`), read whole with one GetItem and
//! changed with conditional UpdateItems, so that no execution environment undoes what another
//! learned (a shorter cooldown never shortens a longer one, one lease at a time); and an item
//! per stored response (`pk = "response#<id>"`) naming the deployment that holds it. The only
//! code that knows DynamoDB. It never waits on its own: the caller bounds every call.

use std::collections::HashMap;
use std::sync::Arc;

use aws_config::SdkConfig;
use aws_config::retry::RetryConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use super::shared::Shared;

/// The one item every environment reads.
const ITEM: &str = "deployments";
/// DynamoDB deletes the item this long after the last change (a cooldown is at most 24 h).
const KEEP_FOR_SECONDS: u64 = 25 * 60 * 60;

/// A stored response's item (`pk = "response#<id>"`) names the deployment that holds it.
const RESPONSE: &str = "response#";
const HOLDER: &str = "deployment";
/// Azure keeps a stored response for 30 days; the fleet remembers where for as long.
const RESPONSE_KEEP_SECONDS: u64 = 30 * 24 * 60 * 60;

/// The fields kept per deployment, as attribute-name suffixes.
const THROTTLED: &str = "|throttled";
const OPEN: &str = "|open";
const OPEN_MS: &str = "|open_ms";
const FAILURES: &str = "|failures";
const LEASE: &str = "|lease";
const LEASEHOLDER: &str = "|leaseholder";

/// A handle on the table, cheap to clone (one HTTP client, shared).
#[derive(Clone)]
pub struct Fleet {
    client: Client,
    table: Arc<str>,
    /// This execution environment, as leases name it.
    me: Arc<str>,
}

/// A call to the table that did not go through. Never carries anything from the item.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FleetError(String);

impl<E: std::error::Error + 'static, R: std::fmt::Debug> From<SdkError<E, R>> for FleetError {
    fn from(error: SdkError<E, R>) -> Self {
        Self(DisplayErrorContext(&error).to_string())
    }
}

/// What a conditional update came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Applied,
    /// The table already held something that wins (a longer cooldown, another's lease).
    Superseded,
}

impl Fleet {
    /// A handle on `table` through the AWS SDK's shared configuration (region, credentials,
    /// `AWS_ENDPOINT_URL`, the environment's one HTTP client).
    pub fn connect(table: &str, aws: &SdkConfig) -> Self {
        let config = aws_sdk_dynamodb::config::Builder::from(aws)
            // One quick retry at most: the caller's time limit is a few tens of milliseconds.
            .retry_config(RetryConfig::standard().with_max_attempts(2))
            .build();
        Self::new(Client::from_conf(config), table)
    }

    pub fn new(client: Client, table: &str) -> Self {
        Self {
            client,
            table: table.into(),
            me: format!("{:016x}", fastrand::u64(..)).into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The DynamoDB client, for what else the fleet keeps in the table (the clients' limits).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The name a deployment goes by in the table: its host (and path) and deployment name,
    /// so every function that calls the same Azure deployment shares what it learns.
    pub fn key(endpoint: &str, deployment: &str) -> String {
        let host = endpoint
            .split_once("://")
            .map_or(endpoint, |(_, rest)| rest);
        format!("{host}/{deployment}")
    }

    /// What the table holds about each of `keys`, in order.
    pub async fn read(&self, keys: &[String]) -> Result<Vec<Shared>, FleetError> {
        let output = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("pk", AttributeValue::S(ITEM.into()))
            .send()
            .await?;
        let empty = HashMap::new();
        let item = output.item().unwrap_or(&empty);
        let number = |key: &str, field: &str| {
            item.get(&format!("{key}{field}"))
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse::<u64>().ok())
        };
        Ok(keys
            .iter()
            .map(|key| Shared {
                throttled_until: number(key, THROTTLED),
                open_until: number(key, OPEN),
                open_ms: number(key, OPEN_MS),
                failures: number(key, FAILURES).map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
                lease_until: number(key, LEASE),
                lease_ours: item
                    .get(&format!("{key}{LEASEHOLDER}"))
                    .and_then(|v| v.as_s().ok())
                    .is_some_and(|who| **who == *self.me),
            })
            .collect())
    }

    /// Throttled until `until` (epoch ms), unless the table knows a longer cooldown; a trial's
    /// lease ends with it.
    pub async fn throttle(&self, key: &str, until: u64, now: u64) -> Result<Written, FleetError> {
        self.update(now)
            .update_expression("SET #t = :until, #exp = :exp REMOVE #l, #w")
            .condition_expression("attribute_not_exists(#t) OR #t < :until")
            .expression_attribute_names("#t", format!("{key}{THROTTLED}"))
            .expression_attribute_names("#l", format!("{key}{LEASE}"))
            .expression_attribute_names("#w", format!("{key}{LEASEHOLDER}"))
            .expression_attribute_values(":until", number(until))
            .send()
            .await
            .map_or_else(conditional, |_| Ok(Written::Applied))
    }

    /// One more consecutive failure; returns how many the fleet has counted.
    pub async fn failed(&self, key: &str, now: u64) -> Result<u32, FleetError> {
        let output = self
            .update(now)
            .update_expression("ADD #f :one SET #exp = :exp")
            .expression_attribute_names("#f", format!("{key}{FAILURES}"))
            .expression_attribute_values(":one", number(1))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await?;
        Ok(output
            .attributes()
            .and_then(|a| a.get(&format!("{key}{FAILURES}")))
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(1))
    }

    /// The circuit is open until `until` (epoch ms), for an opening of `period_ms`, unless the
    /// table has it open longer; the failure count and any lease end with it.
    pub async fn open(
        &self,
        key: &str,
        until: u64,
        period_ms: u64,
        now: u64,
    ) -> Result<Written, FleetError> {
        self.update(now)
            .update_expression("SET #o = :until, #p = :period, #exp = :exp REMOVE #f, #l, #w")
            .condition_expression("attribute_not_exists(#o) OR #o < :until")
            .expression_attribute_names("#o", format!("{key}{OPEN}"))
            .expression_attribute_names("#p", format!("{key}{OPEN_MS}"))
            .expression_attribute_names("#f", format!("{key}{FAILURES}"))
            .expression_attribute_names("#l", format!("{key}{LEASE}"))
            .expression_attribute_names("#w", format!("{key}{LEASEHOLDER}"))
            .expression_attribute_values(":until", number(until))
            .expression_attribute_values(":period", number(period_ms))
            .send()
            .await
            .map_or_else(conditional, |_| Ok(Written::Applied))
    }

    /// The lease on the deployment's next call (a probe, or the trial after a cooldown), until
    /// `until` (epoch ms): `Applied` when this environment holds it, `Superseded` when another
    /// does, or when the table holds a cooldown or an opening still in force (the last trial or
    /// probe has said how it went: there is nothing to try yet).
    pub async fn lease(&self, key: &str, until: u64, now: u64) -> Result<Written, FleetError> {
        self.update(now)
            .update_expression("SET #l = :until, #w = :me, #exp = :exp")
            .condition_expression(
                "(attribute_not_exists(#l) OR #l < :now OR #w = :me) \
                 AND (attribute_not_exists(#t) OR #t <= :now) \
                 AND (attribute_not_exists(#o) OR #o <= :now)",
            )
            .expression_attribute_names("#l", format!("{key}{LEASE}"))
            .expression_attribute_names("#w", format!("{key}{LEASEHOLDER}"))
            .expression_attribute_names("#t", format!("{key}{THROTTLED}"))
            .expression_attribute_names("#o", format!("{key}{OPEN}"))
            .expression_attribute_values(":until", number(until))
            .expression_attribute_values(":now", number(now))
            .expression_attribute_values(":me", AttributeValue::S(self.me.to_string()))
            .send()
            .await
            .map_or_else(conditional, |_| Ok(Written::Applied))
    }

    /// It answered: clears the cooldown, the circuit, the failure count and the lease, unless
    /// a cooldown or an opening is still in force (another environment's newer news).
    pub async fn recovered(&self, key: &str, now: u64) -> Result<Written, FleetError> {
        self.update(now)
            .update_expression("SET #exp = :exp REMOVE #t, #o, #p, #f, #l, #w")
            .condition_expression(
                "(attribute_not_exists(#t) OR #t <= :now) AND (attribute_not_exists(#o) OR #o <= :now)",
            )
            .expression_attribute_names("#t", format!("{key}{THROTTLED}"))
            .expression_attribute_names("#o", format!("{key}{OPEN}"))
            .expression_attribute_names("#p", format!("{key}{OPEN_MS}"))
            .expression_attribute_names("#f", format!("{key}{FAILURES}"))
            .expression_attribute_names("#l", format!("{key}{LEASE}"))
            .expression_attribute_names("#w", format!("{key}{LEASEHOLDER}"))
            .expression_attribute_values(":now", number(now))
            .send()
            .await
            .map_or_else(conditional, |_| Ok(Written::Applied))
    }

    /// The deployment (its [`Fleet::key`]) holding stored response `id`, for as long as Azure
    /// keeps it.
    pub async fn pin(&self, id: &str, key: &str, now: u64) -> Result<(), FleetError> {
        self.client
            .update_item()
            .table_name(&*self.table)
            .key("pk", AttributeValue::S(format!("{RESPONSE}{id}")))
            .update_expression("SET #d = :d, #exp = :exp")
            .expression_attribute_names("#d", HOLDER)
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":d", AttributeValue::S(key.to_owned()))
            .expression_attribute_values(":exp", number(now / 1000 + RESPONSE_KEEP_SECONDS))
            .send()
            .await?;
        Ok(())
    }

    /// The deployment (its [`Fleet::key`]) that holds stored response `id`, if the fleet knows.
    pub async fn holder(&self, id: &str) -> Result<Option<String>, FleetError> {
        let output = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("pk", AttributeValue::S(format!("{RESPONSE}{id}")))
            .send()
            .await?;
        Ok(output
            .item()
            .and_then(|item| item.get(HOLDER))
            .and_then(|v| v.as_s().ok())
            .cloned())
    }

    /// Stored response `id` was deleted.
    pub async fn unpin(&self, id: &str) -> Result<(), FleetError> {
        self.client
            .delete_item()
            .table_name(&*self.table)
            .key("pk", AttributeValue::S(format!("{RESPONSE}{id}")))
            .send()
            .await?;
        Ok(())
    }

    /// An UpdateItem on the one item, keeping it for a day after this change.
    fn update(&self, now: u64) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&*self.table)
            .key("pk", AttributeValue::S(ITEM.into()))
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":exp", number(now / 1000 + KEEP_FOR_SECONDS))
    }
}

fn number(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

/// A failed condition is an answer (someone else's news wins), not an error.
fn conditional<R: std::fmt::Debug>(
    error: SdkError<UpdateItemError, R>,
) -> Result<Written, FleetError> {
    match error.as_service_error() {
        Some(e) if e.is_conditional_check_failed_exception() => Ok(Written::Superseded),
        _ => Err(error.into()),
    }
}
