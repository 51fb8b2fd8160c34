//! Command-line settings of the `loadgen` binary.

use std::time::Duration;

use clap::Parser;

use super::plan::CloseMix;

/// Drives `pipeline` with WebSocket sessions (publishers and subscribers)
/// and keep-alive HTTP requests, then prints a JSON account of exactly what
/// it did on standard output.
///
/// Publishers send `--messages` events each (or for `--duration` seconds) at
/// `--rate` per second. Subscribers connect with `/ws?subscribe=1`, wait for
/// the server's `{"subscribed":true}` before any publisher starts, and stay
/// until the publishers are done and no message has arrived for `--drain-ms`.
/// Every session then ends as `--close-mix` says: a Close frame with a code
/// (and the closing handshake), or `abrupt` — a TCP reset with no Close
/// frame; a publisher resets only after a Ping/Pong round trip showed the
/// server has read everything it sent.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version)]
pub struct LoadgenSettings {
    /// The pipeline's address.
    #[arg(long, env = "LOADGEN_TARGET", default_value = "127.0.0.1:8080")]
    pub target: String,

    /// WebSocket sessions to open in total (publishers + subscribers).
    #[arg(long, env = "LOADGEN_SESSIONS", default_value_t = 10)]
    pub sessions: usize,

    /// Share of the sessions that subscribe instead of publishing, 0 to 1
    /// (rounded to the nearest session).
    #[arg(long, env = "LOADGEN_SUBSCRIBER_SHARE", default_value_t = 0.2,
          value_parser = parse_share)]
    pub subscriber_share: f64,

    /// Messages per second per publisher; 0 sends as fast as the server reads.
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 50.0)]
    pub rate: f64,

    /// Size of each event message in bytes (JSON text, padded; a size below
    /// the smallest possible message gives the smallest message).
    #[arg(long, env = "LOADGEN_MESSAGE_SIZE", default_value_t = 256)]
    pub message_size: usize,

    /// Messages per publisher session (default 100 unless --duration is set).
    #[arg(long, env = "LOADGEN_MESSAGES", conflicts_with = "duration")]
    pub messages: Option<u64>,

    /// Publish for this many seconds instead of a fixed number of messages.
    #[arg(long, env = "LOADGEN_DURATION")]
    pub duration: Option<f64>,

    /// How sessions end, as weights: `1000=2,1001=1,abrupt=1`. Applied to
    /// publishers and to subscribers separately.
    #[arg(long, env = "LOADGEN_CLOSE_MIX", default_value = "1000=1")]
    pub close_mix: CloseMix,

    /// Publishers send a Ping after every K messages (0: only the Ping that
    /// precedes an abrupt close).
    #[arg(long, env = "LOADGEN_PING_EVERY", default_value_t = 0)]
    pub ping_every: u64,

    /// Subscribers sleep this long after each message they read (slow
    /// consumers: the server's outbound queues fill up).
    #[arg(long, env = "LOADGEN_SUBSCRIBER_READ_DELAY_MS", default_value_t = 0)]
    pub subscriber_read_delay_ms: u64,

    /// Subscribers close once the publishers are done and nothing arrived
    /// for this long.
    #[arg(long, env = "LOADGEN_DRAIN_MS", default_value_t = 500)]
    pub drain_ms: u64,

    /// ...but no later than this after the publishers are done.
    #[arg(long, env = "LOADGEN_DRAIN_MAX_MS", default_value_t = 10_000)]
    pub drain_max_ms: u64,

    /// Longest wait for the server's side of a closing handshake or for the
    /// Pong before an abrupt close.
    #[arg(long, env = "LOADGEN_CLOSE_TIMEOUT_MS", default_value_t = 5_000)]
    pub close_timeout_ms: u64,

    /// Longest wait for a TCP connection and the WebSocket handshake.
    #[arg(long, env = "LOADGEN_CONNECT_TIMEOUT_MS", default_value_t = 5_000)]
    pub connect_timeout_ms: u64,

    /// Event kinds, used in turn.
    #[arg(
        long,
        env = "LOADGEN_KINDS",
        value_delimiter = ',',
        default_value = "click,view,purchase,login,logout"
    )]
    pub kinds: Vec<String>,

    /// HTTP GET requests to send, one after another on one keep-alive
    /// connection, before the WebSocket sessions start.
    #[arg(long, env = "LOADGEN_HTTP_REQUESTS", default_value_t = 0)]
    pub http_requests: u64,

    /// Path of those requests.
    #[arg(long, env = "LOADGEN_HTTP_PATH", default_value = "/health")]
    pub http_path: String,

    /// Include one record per session in the summary.
    #[arg(long, env = "LOADGEN_PER_SESSION", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub per_session: bool,

    /// Also write the summary to this file.
    #[arg(long, env = "LOADGEN_SUMMARY")]
    pub summary: Option<std::path::PathBuf>,
}

pub const DEFAULT_MESSAGES: u64 = 100;

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be between 0 and 1".into())
    }
}

/// When publishers stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PublishLimit {
    Messages(u64),
    Duration(Duration),
}

impl LoadgenSettings {
    pub fn publish_limit(&self) -> PublishLimit {
        match (self.messages, self.duration) {
            (Some(n), _) => PublishLimit::Messages(n),
            (None, Some(secs)) => PublishLimit::Duration(Duration::from_secs_f64(secs.max(0.0))),
            (None, None) => PublishLimit::Messages(DEFAULT_MESSAGES),
        }
    }

    /// The pause between two messages of one publisher, if paced.
    pub fn message_interval(&self) -> Option<Duration> {
        (self.rate > 0.0 && self.rate.is_finite()).then(|| Duration::from_secs_f64(1.0 / self.rate))
    }

    pub fn close_timeout(&self) -> Duration {
        Duration::from_millis(self.close_timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_limits() {
        let s = LoadgenSettings::try_parse_from(["loadgen"]).expect("parse");
        assert_eq!(s.publish_limit(), PublishLimit::Messages(DEFAULT_MESSAGES));
        assert_eq!(s.message_interval(), Some(Duration::from_millis(20)));
        let s = LoadgenSettings::try_parse_from(["loadgen", "--duration", "1.5", "--rate", "0"])
            .expect("parse");
        assert_eq!(
            s.publish_limit(),
            PublishLimit::Duration(Duration::from_millis(1500))
        );
        assert_eq!(s.message_interval(), None);
        assert!(
            LoadgenSettings::try_parse_from(["loadgen", "--duration", "1", "--messages", "3"])
                .is_err()
        );
        assert!(LoadgenSettings::try_parse_from(["loadgen", "--subscriber-share", "1.5"]).is_err());
        assert!(LoadgenSettings::try_parse_from(["loadgen", "--close-mix", "1006=1"]).is_err());
    }
}
