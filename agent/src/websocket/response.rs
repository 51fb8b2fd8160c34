//! WebSocket response time: for a session whose traced end is the server,
//! the time from each data message it receives to the next data message it
//! sends on that session (`pipelens_websocket_response_duration_seconds`).
//! Sessions that only push (subscribers) or only receive (a sink that never
//! answers) have no response time; a message still unanswered when its
//! session ends is not one either.

/// Received messages waiting for the next sent one, per session. More than
/// this many unanswered in a row: the later ones are not timed (each timed
/// one is from its own arrival, so keeping the earliest keeps the longest).
pub const MAX_WAITING: usize = 256;

#[derive(Debug, Default)]
pub struct Responses {
    /// Arrival times (ns) of data messages not yet followed by a sent one.
    waiting: Vec<u64>,
}

impl Responses {
    /// A data message was received at `ts_ns`; false when it cannot be
    /// timed ([`MAX_WAITING`] are already waiting).
    pub fn received(&mut self, ts_ns: u64) -> bool {
        let room = self.waiting.len() < MAX_WAITING;
        if room {
            self.waiting.push(ts_ns);
        }
        room
    }

    /// A data message was sent at `ts_ns`: the response time of every
    /// message received since the last one sent, in seconds.
    pub fn sent(&mut self, ts_ns: u64) -> impl Iterator<Item = f64> + '_ {
        self.waiting
            .drain(..)
            .map(move |t| ts_ns.saturating_sub(t) as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_received_message_is_timed_to_the_next_sent_one() {
        let mut r = Responses::default();
        // A sent message with nothing received before it answers nothing.
        assert_eq!(r.sent(5).count(), 0);
        r.received(1_000_000_000);
        r.received(1_500_000_000);
        let got: Vec<f64> = r.sent(2_000_000_000).collect();
        assert_eq!(got, [1.0, 0.5]);
        // Already answered: a second send times nothing.
        assert_eq!(r.sent(3_000_000_000).count(), 0);
        r.received(4_000_000_000);
        assert_eq!(r.sent(4_250_000_000).collect::<Vec<_>>(), [0.25]);
    }

    #[test]
    fn a_flood_of_unanswered_messages_is_bounded_and_counted() {
        let mut r = Responses::default();
        let timed = (0..(MAX_WAITING as u64 + 10))
            .filter(|&i| r.received(i))
            .count();
        assert_eq!(timed, MAX_WAITING);
        assert_eq!(r.sent(1_000).count(), MAX_WAITING);
    }
}
