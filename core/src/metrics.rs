//! Broker metrics: per-topic record and byte counters, request latency histograms per API,
//! connection and partition gauges, rendered as Prometheus text on `metrics_listen`.
//!
//! Counters are atomics so the request path never takes a lock to count; the per-topic
//! table is looked up once per request.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use quiver_protocol::ApiKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Latency bucket bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Counters of one topic.
#[derive(Default)]
pub struct TopicCounters {
    /// Records appended.
    pub records_in: AtomicU64,
    /// Bytes appended.
    pub bytes_in: AtomicU64,
    /// Bytes sent to consumers.
    pub bytes_out: AtomicU64,
    /// Batches sent to consumers.
    pub batches_out: AtomicU64,
}

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; 14],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// All broker metrics.
#[derive(Default)]
pub struct Metrics {
    topics: RwLock<HashMap<String, Arc<TopicCounters>>>,
    requests: RwLock<HashMap<&'static str, Arc<Histogram>>>,
    request_errors: AtomicU64,
    /// Open client connections.
    pub connections: AtomicI64,
    /// Requests being read, handled or answered.
    pub requests_in_flight: AtomicI64,
    /// Partitions hosted.
    pub partitions: AtomicI64,
}

impl Metrics {
    /// The counters of `topic`, created on first use.
    pub fn topic(&self, topic: &str) -> Arc<TopicCounters> {
        if let Some(c) = self
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
        {
            return c.clone();
        }
        self.topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(topic.to_string())
            .or_default()
            .clone()
    }

    /// Forgets a deleted topic.
    pub fn remove_topic(&self, topic: &str) {
        self.topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic);
    }

    /// Records one request's latency and outcome.
    pub fn observe_request(&self, api: Option<ApiKey>, elapsed: Duration, ok: bool) {
        let name = api.map_or("Unknown", ApiKey::name);
        let h = {
            let r = self.requests.read().unwrap_or_else(|p| p.into_inner());
            r.get(name).cloned()
        };
        let h = h.unwrap_or_else(|| {
            self.requests
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(name)
                .or_default()
                .clone()
        });
        h.observe(elapsed);
        if !ok {
            self.request_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<_> = topics.keys().collect();
        names.sort();
        for (metric, help, get) in [
            ("quiver_records_in_total", "Records appended.", 0),
            ("quiver_bytes_in_total", "Bytes of batches appended.", 1),
            (
                "quiver_bytes_out_total",
                "Bytes of batches sent to consumers.",
                2,
            ),
            ("quiver_batches_out_total", "Batches sent to consumers.", 3),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for n in &names {
                let c = &topics[*n];
                let v = [&c.records_in, &c.bytes_in, &c.bytes_out, &c.batches_out][get]
                    .load(Ordering::Relaxed);
                let _ = writeln!(out, "{metric}{{topic=\"{n}\"}} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP quiver_request_duration_seconds Request latency by API.\n# TYPE quiver_request_duration_seconds histogram"
        );
        let reqs = self.requests.read().unwrap_or_else(|p| p.into_inner());
        let mut apis: Vec<_> = reqs.keys().collect();
        apis.sort();
        for api in apis {
            let h = &reqs[api];
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "quiver_request_duration_seconds_bucket{{api=\"{api}\",le=\"{b}\"}} {}",
                    h.buckets[i].load(Ordering::Relaxed)
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "quiver_request_duration_seconds_bucket{{api=\"{api}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "quiver_request_duration_seconds_sum{{api=\"{api}\"}} {}",
                h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "quiver_request_duration_seconds_count{{api=\"{api}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP quiver_request_errors_total Requests answered with an error.\n# TYPE quiver_request_errors_total counter\nquiver_request_errors_total {}",
            self.request_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP quiver_connections Open client connections.\n# TYPE quiver_connections gauge\nquiver_connections {}",
            self.connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP quiver_requests_in_flight Requests being read, handled or answered.\n# TYPE quiver_requests_in_flight gauge\nquiver_requests_in_flight {}",
            self.requests_in_flight.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP quiver_partitions Partitions hosted by this broker.\n# TYPE quiver_partitions gauge\nquiver_partitions {}",
            self.partitions.load(Ordering::Relaxed)
        );
        out
    }
}

/// Serves `GET /metrics` on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let Ok((mut sock, _)) = accepted else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    let m = sock.read(&mut buf[n..]).await?;
                    if m == 0 {
                        break;
                    }
                    n += m;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics ") || req.starts_with("GET / ") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
