//! Request counts, latencies and database errors, served at `/metrics` in Prometheus' text
//! format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

#[derive(Debug, Default)]
struct Route {
    by_status: BTreeMap<u16, u64>,
    buckets: [u64; BUCKETS.len()],
    count: u64,
    seconds: f64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<String, Route>>,
    db_errors: Mutex<u64>,
}

impl Metrics {
    pub fn observe(&self, route: &str, status: u16, took: Duration) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let r = routes.entry(route.to_string()).or_default();
        *r.by_status.entry(status).or_default() += 1;
        let s = took.as_secs_f64();
        for (bound, n) in BUCKETS.iter().zip(r.buckets.iter_mut()) {
            if s <= *bound {
                *n += 1;
            }
        }
        r.count += 1;
        r.seconds += s;
    }

    pub fn db_error(&self) {
        *self.db_errors.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str("# HELP rlhf_http_requests_total Requests answered, by route and status.\n");
        out.push_str("# TYPE rlhf_http_requests_total counter\n");
        for (route, r) in routes.iter() {
            for (status, n) in &r.by_status {
                let _ = writeln!(
                    out,
                    "rlhf_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP rlhf_http_request_duration_seconds Time to answer, by route.\n");
        out.push_str("# TYPE rlhf_http_request_duration_seconds histogram\n");
        for (route, r) in routes.iter() {
            for (bound, n) in BUCKETS.iter().zip(r.buckets.iter()) {
                let _ = writeln!(
                    out,
                    "rlhf_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "rlhf_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                r.count
            );
            let _ = writeln!(
                out,
                "rlhf_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                r.seconds
            );
            let _ = writeln!(
                out,
                "rlhf_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                r.count
            );
        }
        let db = *self.db_errors.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str("# HELP rlhf_db_errors_total Database operations that failed.\n");
        out.push_str("# TYPE rlhf_db_errors_total counter\n");
        let _ = writeln!(out, "rlhf_db_errors_total {db}");
        out
    }
}
