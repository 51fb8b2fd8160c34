//! HTTP/1.1 and WebSocket (RFC 6455) stream parsing.
