//! PostgreSQL wire protocol: framing, request/reply pairing, SQL normalisation.
