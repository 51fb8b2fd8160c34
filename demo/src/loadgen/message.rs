//! Event messages of an exact size.

/// `{"kind":K,"payload":{"session":S,"seq":N,"pad":"xx…"}}`, with the pad
/// sized so that the whole text is `size` bytes — or the unpadded message
/// when that is already larger.
pub fn event_message(kind: &str, session: usize, seq: u64, size: usize) -> String {
    let kind = serde_json::Value::from(kind).to_string();
    let head = format!(r#"{{"kind":{kind},"payload":{{"session":{session},"seq":{seq},"pad":""#);
    const TAIL: &str = r#""}}"#;
    let pad = size.saturating_sub(head.len() + TAIL.len());
    let mut message = String::with_capacity(head.len() + pad + TAIL.len());
    message.push_str(&head);
    message.extend(std::iter::repeat_n('x', pad));
    message.push_str(TAIL);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_requested_size_and_are_events() {
        for size in [60, 61, 100, 256, 4096] {
            let m = event_message("click", 3, 17, size);
            assert_eq!(m.len(), size);
            let v: serde_json::Value = serde_json::from_str(&m).expect("json");
            assert_eq!(v["kind"], "click");
            assert_eq!(v["payload"]["seq"], 17);
        }
    }

    #[test]
    fn small_sizes_give_the_smallest_message() {
        let m = event_message("view", 12, 123_456, 1);
        assert_eq!(
            m,
            r#"{"kind":"view","payload":{"session":12,"seq":123456,"pad":""}}"#
        );
    }

    #[test]
    fn kinds_are_escaped() {
        let m = event_message("a\"b", 0, 0, 0);
        let v: serde_json::Value = serde_json::from_str(&m).expect("json");
        assert_eq!(v["kind"], "a\"b");
    }
}
