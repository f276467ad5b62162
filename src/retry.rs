//! The retry loop the Hugging Face Hub clients and the Ray Jobs client share: the push in
//! `deploy::hub`, the model download in `hub::download`, and `train::ray::client`. An attempt succeeds, fails for good, or fails in a way worth
//! another try (a transport error, a 5xx or 429, a body cut short); the wait doubles from a first
//! backoff and attempts are bounded, then the last failure is returned. [`describe_transport`]
//! is how a transport failure reads in those messages (the feedback pull uses it too).
//!
//! The feedback pull (`feedback::http_source`: full jitter, `Retry-After`) and the GitHub client
//! (`forge::github`: rate-limit headers, creates checked before a retry) keep their own rules,
//! which this loop deliberately does not have: the Hub sends neither.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

/// How many times to try and how long to wait first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Attempts, the first included (at least 1 is made).
    pub max_attempts: u32,
    /// Wait after the first failure; doubles after each further one.
    pub first_wait: Duration,
}

impl Backoff {
    /// The wait after the `n`th failure (n ≥ 1): `first_wait`, doubled for each failure before
    /// it. Also the pace of status polling (`train::ray::follow`), capped there.
    pub fn wait_after(&self, n: u32) -> Duration {
        self.first_wait
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
    }
}

/// Why an attempt failed, and whether trying again can help.
#[derive(Debug)]
pub enum Failure<E> {
    /// Ambiguous or transient: worth another attempt.
    Retry(E),
    /// Asking again cannot succeed (a 4xx, a failed checksum, a full disk).
    Fatal(E),
}

impl<E> Failure<E> {
    /// `Retry` when `retryable`, else `Fatal`.
    pub fn new(retryable: bool, error: E) -> Self {
        if retryable {
            Self::Retry(error)
        } else {
            Self::Fatal(error)
        }
    }
}

/// Runs `attempt(n)` (n = 1, 2, …) until it succeeds, fails fatally, or `max_attempts` ran out.
/// Each retry is logged with its reason (errors here never hold a secret: the callers' error
/// types redact URLs and bodies).
pub async fn retrying<T, E, Fut>(
    backoff: Backoff,
    mut attempt: impl FnMut(u32) -> Fut,
) -> Result<T, E>
where
    E: Display,
    Fut: Future<Output = Result<T, Failure<E>>>,
{
    let mut n = 0;
    loop {
        n += 1;
        match attempt(n).await {
            Ok(value) => return Ok(value),
            Err(Failure::Fatal(error)) => return Err(error),
            Err(Failure::Retry(error)) => {
                if n >= backoff.max_attempts {
                    return Err(error);
                }
                let wait = backoff.wait_after(n);
                // The first line says what failed; the hint after it is for the final error.
                let what = error.to_string();
                let what = what.lines().next().unwrap_or_default();
                tracing::warn!("{what}; retrying in {:.1}s", wait.as_secs_f64());
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A transport failure in one line: what kind (timeout, connect, other), reqwest's message and
/// its innermost cause ("Connection refused", "dns error"), which reqwest's own text omits.
pub fn describe_transport(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    // The URL reqwest names never carries a token: tokens go in headers.
    let mut source = String::new();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        source = c.to_string();
        cause = c.source();
    }
    if source.is_empty() {
        format!("{kind}: {e}")
    } else {
        format!("{kind}: {e}: {source}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_until_success_and_stops_at_fatal_or_the_limit() {
        let quick = Backoff {
            max_attempts: 3,
            first_wait: Duration::from_millis(1),
        };
        let got: Result<u32, String> = retrying(quick, |n| async move {
            if n < 3 {
                Err(Failure::Retry(format!("try {n}")))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(got, Ok(3));

        let mut calls = 0;
        let got: Result<(), String> = retrying(quick, |n| {
            calls += 1;
            async move { Err(Failure::Retry(format!("try {n}"))) }
        })
        .await;
        assert_eq!(got, Err("try 3".to_string()));
        assert_eq!(calls, 3);

        let mut calls = 0;
        let got: Result<(), String> = retrying(quick, |_| {
            calls += 1;
            async { Err(Failure::Fatal("no".to_string())) }
        })
        .await;
        assert_eq!(got, Err("no".to_string()));
        assert_eq!(calls, 1);
    }
}
