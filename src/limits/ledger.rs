//! The fleet's count of what each client was granted per window, in the health table: an item
//! per (client, limit, window) (`pk = "limit#<client>#<limit>#<window start>"`) whose `granted`
//! grows by atomic, conditional `ADD`s, so that the grants of every execution environment
//! together never pass the limit. Items expire a day after their window. It never waits on its
//! own: the caller bounds every call.

use std::sync::Arc;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use crate::health::Fleet;

const GRANTED: &str = "granted";
/// An item outlives its window by this much, then DynamoDB's TTL removes it.
const KEEP_AFTER_WINDOW_SECONDS: u64 = 24 * 60 * 60;

/// A handle on the table, cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    client: Client,
    table: Arc<str>,
}

/// A call to the table that did not go through. Never carries anything from the item.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LedgerError(String);

impl Ledger {
    /// The fleet's health table, through the client its [`Fleet`] handle uses.
    pub fn of(fleet: &Fleet) -> Self {
        Self {
            client: fleet.client().clone(),
            table: fleet.table().into(),
        }
    }

    /// The item of `client`'s limit `limit_name` in the window starting at `window_start`.
    pub fn key(client: &str, limit_name: &str, window_start: u64) -> String {
        format!("limit#{client}#{limit_name}#{window_start}")
    }

    /// Grants `amount` more of item `key`'s window if the fleet's grants stay within `limit`:
    /// what the fleet has been granted with it (`Some`), or `None` when it would pass the limit.
    pub async fn grant(
        &self,
        key: &str,
        amount: u64,
        limit: u64,
        window_end_ms: u64,
    ) -> Result<Option<u64>, LedgerError> {
        let Some(room) = limit.checked_sub(amount) else {
            return Ok(None);
        };
        let result = self
            .client
            .update_item()
            .table_name(&*self.table)
            .key("pk", AttributeValue::S(key.to_owned()))
            .update_expression("ADD #g :n SET #exp = :exp")
            .condition_expression("attribute_not_exists(#g) OR #g <= :room")
            .expression_attribute_names("#g", GRANTED)
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":n", number(amount))
            .expression_attribute_values(":room", number(room))
            .expression_attribute_values(
                ":exp",
                number(window_end_ms / 1000 + KEEP_AFTER_WINDOW_SECONDS),
            )
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await;
        match result {
            Ok(output) => Ok(Some(
                output
                    .attributes()
                    .and_then(|a| a.get(GRANTED))
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(amount),
            )),
            Err(error) => match error.as_service_error() {
                Some(e) if e.is_conditional_check_failed_exception() => Ok(None),
                _ => Err(describe(error)),
            },
        }
    }

    /// Gives `amount` of item `key`'s window back to the fleet: leased, and not spent.
    pub async fn release(&self, key: &str, amount: u64) -> Result<(), LedgerError> {
        self.client
            .update_item()
            .table_name(&*self.table)
            .key("pk", AttributeValue::S(key.to_owned()))
            .update_expression("ADD #g :n")
            .condition_expression("attribute_exists(#g)")
            .expression_attribute_names("#g", GRANTED)
            .expression_attribute_values(":n", AttributeValue::N(format!("-{amount}")))
            .send()
            .await
            .map(|_| ())
            .map_err(describe)
    }
}

fn number(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

fn describe<E: std::error::Error + 'static, R: std::fmt::Debug>(
    error: SdkError<E, R>,
) -> LedgerError {
    LedgerError(DisplayErrorContext(&error).to_string())
}
