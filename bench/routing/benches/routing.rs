//! One routing decision plus its bookkeeping, over a pool of 16 deployments in 4 priority
//! groups: choose the next deployment, then record what the call came to.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use fallback_chat::health::{Breaker, Event, HealthTable};
use fallback_chat::pool::{ApiStyle, Deployment};
use fallback_chat::secret::Secret;

fn pool() -> Vec<Deployment> {
    (0..16)
        .map(|i| Deployment {
            id: format!("deployment-{i}"),
            endpoint: format!("https://region-{}.openai.azure.com", i / 4),
            deployment: "gpt-4o".into(),
            key: Some(Secret::new("k")),
            key_var: "K".into(),
            api: ApiStyle::Classic {
                api_version: "2024-10-21".into(),
            },
            priority: (i / 4) as u32,
            weight: f64::from(1 + i % 3),
            context_window: None,
            serves: Default::default(),
            auth: Default::default(),
        })
        .collect()
}

fn routing(c: &mut Criterion) {
    let pool = pool();
    let members: Vec<usize> = (0..pool.len()).collect();
    let breaker = Breaker {
        failures: 3,
        open_for: Duration::from_secs(30),
        probe_lease: Duration::from_secs(10),
    };
    let success = |ms| Event::Success {
        latency: Duration::from_millis(ms),
        remaining_requests: Some(100),
        remaining_tokens: Some(10_000),
    };

    let health = HealthTable::new(pool.len(), breaker, 1);
    let now = Instant::now();
    for i in 0..pool.len() {
        health.record(i, success(100 + i as u64), now);
    }
    c.bench_function("select + record, 16 deployments, all healthy", |b| {
        b.iter(|| decide(&health, &members, &pool, now))
    });

    // The first three groups are out (throttled or open): the choice scans all 16.
    let health = HealthTable::new(pool.len(), breaker, 1);
    for i in 0..12 {
        if i % 2 == 0 {
            let until = now + Duration::from_secs(3600);
            health.record(i, Event::Throttled { until }, now);
        } else {
            for _ in 0..3 {
                health.record(i, Event::Failure, now);
            }
        }
    }
    for i in 12..16 {
        health.record(i, success(100 + i as u64), now);
    }
    c.bench_function("select + record, 16 deployments, 12 out", |b| {
        b.iter(|| decide(&health, &members, &pool, now))
    });
}

/// One routing decision and the bookkeeping of its (successful) outcome.
fn decide(health: &HealthTable, members: &[usize], pool: &[Deployment], now: Instant) -> usize {
    let i = health
        .select(black_box(members), pool, |_| false, now)
        .unwrap_or(0);
    health.record(
        i,
        Event::Success {
            latency: Duration::from_millis(120),
            remaining_requests: Some(100),
            remaining_tokens: Some(10_000),
        },
        now,
    );
    black_box(i)
}

criterion_group!(benches, routing);
criterion_main!(benches);
