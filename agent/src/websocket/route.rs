//! Route classes: an HTTP request target folded to the shape of its route,
//! so that a metric label or a snapshot row names `/events/{id}`, never a
//! raw path, an identifier or a query string.

/// What a variable segment folds to.
pub const ID: &str = "{id}";
/// Segments kept; deeper paths end in `/…`.
const MAX_SEGMENTS: usize = 8;
/// A longer segment is taken for a value (token, slug, hash), not a name.
const MAX_SEGMENT_CHARS: usize = 32;

/// The route class of a request target (RFC 9112 §3.2: origin, absolute,
/// authority or asterisk form). The query and fragment are dropped; a
/// segment that is numeric, that holds digits and is 8 characters or more
/// (UUIDs, hashes, dates) or is at least half digits (4 or more
/// characters: `v2` stays), that is over 32 characters long, or that holds anything but letters, digits, `-`,
/// `_` and `.` (percent-encoded values, e-mail addresses, `key=value`
/// matrix parameters) becomes `{id}`.
pub fn route_class(target: &str) -> String {
    if target == "*" {
        return "*".to_owned();
    }
    let path = match target.find("://") {
        // Absolute form: the path starts after the authority.
        Some(i) => match target[i + 3..].find('/') {
            Some(j) => &target[i + 3 + j..],
            None => "/",
        },
        // Authority form (CONNECT host:port) names a host, not a route.
        None if target.is_empty() => "/",
        None if !target.starts_with('/') => return ID.to_owned(),
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or("/");
    let mut out = String::new();
    for (n, segment) in path.split('/').skip(1).enumerate() {
        if n == MAX_SEGMENTS {
            out.push_str("/…");
            break;
        }
        out.push('/');
        out.push_str(if is_variable(segment) { ID } else { segment });
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn is_variable(segment: &str) -> bool {
    let digits = segment.bytes().filter(u8::is_ascii_digit).count();
    let named = segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    !named
        || segment.len() > MAX_SEGMENT_CHARS
        || (digits > 0
            && (digits == segment.len()
                || segment.len() >= 8
                || (segment.len() >= 4 && digits * 2 >= segment.len())))
        || (segment.len() >= 16 && segment.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_hashes_and_queries_fold() {
        for (target, want) in [
            ("/", "/"),
            ("", "/"),
            ("/health", "/health"),
            ("/events/recent?limit=50", "/events/recent"),
            ("/events/12345", "/events/{id}"),
            ("/users/42/orders/7", "/users/{id}/orders/{id}"),
            (
                "/objects/3f2b9c1e-8d4a-4b1e-9f00-2c6d5e7a8b90",
                "/objects/{id}",
            ),
            (
                "/blobs/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "/blobs/{id}",
            ),
            ("/blobs/deadbeefdeadbeef", "/blobs/{id}"),
            ("/day/2026-12-02", "/day/{id}"),
            ("/search/caf%C3%A9", "/search/{id}"),
            ("/mail/someone@example.com", "/mail/{id}"),
            ("/api/v2/items", "/api/v2/items"),
            ("/static/app.min.js", "/static/app.min.js"),
            ("/ws#frag", "/ws"),
            ("http://example.com/events/99?x=1", "/events/{id}"),
            ("http://example.com", "/"),
            ("example.com:443", "{id}"),
            ("*", "*"),
            ("/a/b/c/d/e/f/g/h/i/j", "/a/b/c/d/e/f/g/h/…"),
            ("/trailing/", "/trailing/"),
        ] {
            assert_eq!(route_class(target), want, "{target:?}");
        }
    }

    #[test]
    fn no_literal_survives() {
        let secret = "s3cr3t-t0ken-value";
        for target in [
            format!("/reset/{secret}"),
            format!("/p?token={secret}"),
            format!("/x;token={secret}/y"),
        ] {
            assert!(!route_class(&target).contains("t0ken"), "{target}");
        }
    }
}
