//! Prints how long a fresh process takes to draw its first random bytes from AWS-LC: the cost
//! every cold start pays at its first TLS handshake. Run by `scripts/measure-jitter.sh`, once
//! built with AWS-LC's CPU jitter entropy source and once without.

use std::time::Instant;

fn main() {
    let started = Instant::now();
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("AWS-LC draws random bytes");
    println!("{}", started.elapsed().as_micros());
}
