//! SQL normalisation: the template a statement is reported under, with
//! every literal and `$n` parameter replaced by `?` (so the simple and the
//! extended protocol report one template), IN and VALUES lists collapsed,
//! comments and whitespace folded.
//!
//! Tokenising is done by the `sqlparser` crate's tokenizer with its
//! PostgreSQL dialect: it knows PostgreSQL's string forms (`E'…'` escapes,
//! `$tag$…$tag$` dollar quoting, `U&'…'`, `B'…'`/`X'…'`), nested comments
//! and `$n` parameters, which is exactly what a hand-written splitter gets
//! wrong and what decides whether a literal could leak into a label. Only
//! the tokenizer is used, not the parser: statements need not be valid,
//! complete or of a version sqlparser knows to be templated. A statement the
//! tokenizer rejects (an unterminated quote in a truncated capture) is
//! reported as `unparseable`, never as raw text.

use std::sync::atomic::{AtomicBool, Ordering};

use sqlparser::{
    dialect::PostgreSqlDialect,
    tokenizer::{Token, Tokenizer, Whitespace},
};

/// Longest template kept; longer ones are cut (the literals are gone by
/// then, so the cut cannot expose one).
pub const MAX_TEMPLATE: usize = 1024;
pub const UNPARSEABLE: &str = "unparseable";

/// `--mask-identifiers`: quoted identifiers become `"?"` too.
static MASK_QUOTED: AtomicBool = AtomicBool::new(false);

/// Sets, for the whole run, whether quoted identifiers are masked.
pub fn mask_quoted_identifiers(on: bool) {
    MASK_QUOTED.store(on, Ordering::Relaxed);
}

/// The normalised template of `sql`, masking as the run was told to.
pub fn template(sql: &str) -> String {
    template_with(sql, MASK_QUOTED.load(Ordering::Relaxed))
}

/// The normalised template of `sql`; with `mask_quoted`, a quoted
/// identifier (which may carry anything: `"user@example.com"`) is `"?"`.
pub fn template_with(sql: &str, mask_quoted: bool) -> String {
    let dialect = PostgreSqlDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize() else {
        return UNPARSEABLE.to_owned();
    };
    let mut out = String::with_capacity(sql.len().min(MAX_TEMPLATE));
    let mut pending_space = false;
    for token in &tokens {
        let piece = match token {
            Token::Whitespace(Whitespace::Space | Whitespace::Newline | Whitespace::Tab)
            | Token::Whitespace(_) => {
                pending_space = true;
                continue;
            }
            Token::EOF => continue,
            Token::SemiColon => {
                // A trailing semicolon is not part of the template; inner ones
                // (several statements in one simple query) are.
                ";".to_owned()
            }
            t if is_literal(t) => "?".to_owned(),
            Token::Placeholder(p) if p.starts_with('$') => "?".to_owned(),
            // Words are kept as written: sqlparser's keyword list includes
            // non-reserved words (`id`, `name`, `value`) that are column
            // names far more often than keywords.
            //
            // A quoted identifier is written back with PostgreSQL's one
            // escape, `""` (§4.1.1): sqlparser's Display leaves a quote after
            // a backslash undoubled, which ends the identifier early.
            Token::Word(w) if w.quote_style == Some('"') && mask_quoted => "\"?\"".to_owned(),
            Token::Word(w) if w.quote_style == Some('"') => {
                format!("\"{}\"", w.value.replace('"', "\"\""))
            }
            Token::Word(w) => w.to_string(),
            t => t.to_string(),
        };
        if pending_space && !out.is_empty() && needs_space(&out, &piece) {
            out.push(' ');
        }
        // Canonical spacing: one space after a comma, whatever was written.
        pending_space = piece == ",";
        out.push_str(&piece);
        if out.len() > MAX_TEMPLATE * 4 {
            break;
        }
    }
    // Every trailing `;`, also when spaces part them (`SELECT 1; ;`).
    let mut t = out
        .trim()
        .trim_end_matches(|c: char| c == ';' || c.is_whitespace())
        .to_owned();
    t = collapse_lists(&t);
    if t.len() > MAX_TEMPLATE {
        let mut end = MAX_TEMPLATE;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t.truncate(end);
        t.push('…');
    }
    if t.is_empty() {
        return "empty".to_owned();
    }
    t
}

fn needs_space(out: &str, piece: &str) -> bool {
    let last = out.chars().last().unwrap_or(' ');
    let first = piece.chars().next().unwrap_or(' ');
    !(last == '(' || first == ')' || first == ',' || last == '.' || first == '.')
}

fn is_literal(t: &Token) -> bool {
    matches!(
        t,
        Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::QuoteDelimitedStringLiteral(_)
            | Token::NationalQuoteDelimitedStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
    )
}

/// `IN (?, ?, ?)` → `IN (?)`, `VALUES (?, ?), (?, ?)` → `VALUES (?)`: a
/// statement run with 3 or 300 values is one template.
fn collapse_lists(s: &str) -> String {
    let mut t = s.to_owned();
    loop {
        let next = t.replace("?, ?", "?").replace("(?), (?)", "(?)");
        if next == t {
            return t;
        }
        t = next;
    }
}

/// The statement's operation: its first keyword, or for `WITH … ` the
/// statement the common table expressions lead to.
pub fn operation(template: &str) -> &'static str {
    let words = tokens_with_depth(template);
    let Some(first) = words.first().and_then(|(w, _)| known_operation(w)) else {
        return "OTHER";
    };
    if first != "WITH" {
        return first;
    }
    words
        .iter()
        .skip(1)
        .filter(|(_, depth)| *depth == 0)
        .filter_map(|(w, _)| known_operation(w))
        .find(|op| matches!(*op, "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE"))
        .unwrap_or("WITH")
}

fn tokens_with_depth(t: &str) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut word = String::new();
    let mut in_quote = false;
    for c in t.chars() {
        if c == '"' {
            in_quote = !in_quote;
        }
        if in_quote {
            continue;
        }
        match c {
            '(' => {
                flush(&mut word, depth, &mut out);
                depth += 1;
            }
            ')' => {
                flush(&mut word, depth, &mut out);
                depth -= 1;
            }
            c if c.is_ascii_alphabetic() || c == '_' => word.push(c),
            _ => flush(&mut word, depth, &mut out),
        }
    }
    flush(&mut word, depth, &mut out);
    out
}

fn flush(word: &mut String, depth: i32, out: &mut Vec<(String, i32)>) {
    if !word.is_empty() {
        out.push((std::mem::take(word), depth));
    }
}

fn known_operation(word: &str) -> Option<&'static str> {
    const OPS: &[&str] = &[
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "WITH",
        "VALUES",
        "TABLE",
        "COPY",
        "BEGIN",
        "START",
        "COMMIT",
        "END",
        "ROLLBACK",
        "SAVEPOINT",
        "RELEASE",
        "PREPARE",
        "EXECUTE",
        "DEALLOCATE",
        "CREATE",
        "DROP",
        "ALTER",
        "TRUNCATE",
        "GRANT",
        "REVOKE",
        "SET",
        "RESET",
        "SHOW",
        "EXPLAIN",
        "ANALYZE",
        "VACUUM",
        "LOCK",
        "LISTEN",
        "NOTIFY",
        "UNLISTEN",
        "DECLARE",
        "FETCH",
        "MOVE",
        "CLOSE",
        "DISCARD",
        "CALL",
        "DO",
        "REFRESH",
        "REINDEX",
        "CLUSTER",
        "CHECKPOINT",
        "COMMENT",
    ];
    let upper = word.to_ascii_uppercase();
    OPS.iter().find(|op| **op == upper).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `sql_template` fuzz target: only the last of several
    /// trailing semicolons was dropped, so `S; ;` had the template `S;`,
    /// another template than `S`'s, and a template that was not its own.
    /// Found by the `sql_template` fuzz target: `"\"""` (the identifier
    /// `\"`) was templated `"\""`, which does not even tokenise: the
    /// quote after the backslash was not doubled again.
    #[test]
    fn quoted_identifiers_keep_their_doubled_quotes() {
        assert_eq!(template(r#"SELECT "\""" FROM t"#), r#"SELECT "\""" FROM t"#);
        assert_eq!(
            template(r#"SELECT "a""b" FROM "t""#),
            r#"SELECT "a""b" FROM "t""#
        );
        let t = template(r#""\""""#);
        assert_eq!(template(&t), t);
    }

    #[test]
    fn every_trailing_semicolon_is_dropped() {
        assert_eq!(template("S&CT1TL; ;"), "S&CT1TL");
        assert_eq!(template("SELECT 1;;\n ; "), "SELECT ?");
        assert_eq!(template("SELECT 1; SELECT 2;"), "SELECT ?; SELECT ?");
        let t = template("S&CT1TL; ;");
        assert_eq!(template(&t), t);
    }

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(
            template("SELECT abalance FROM pgbench_accounts WHERE aid = 74815;"),
            "SELECT abalance FROM pgbench_accounts WHERE aid = ?"
        );
        assert_eq!(
            template("SELECT abalance FROM pgbench_accounts\n  WHERE aid = $1"),
            "SELECT abalance FROM pgbench_accounts WHERE aid = ?"
        );
        let t =
            template("INSERT INTO users (email, age) VALUES ('alice@example.com', 42) -- who\n");
        assert_eq!(t, "INSERT INTO users (email, age) VALUES (?)");
        assert!(!t.contains("alice") && !t.contains("42"));
    }

    #[test]
    fn postgres_string_forms_never_leak() {
        for sql in [
            "SELECT E'it''s \\n secret'",
            "SELECT $$secret$$",
            "SELECT $tag$sec'ret$tag$",
            "SELECT U&'secr\\0065t'",
            "SELECT X'5ec7e7', B'1010'",
            "SELECT 'a' 'secret'",
            "SELECT 1.5e10, .5, 0x1f",
        ] {
            let t = template(sql);
            assert!(!t.to_lowercase().contains("secr"), "{sql} → {t}");
            assert!(!t.contains("1.5") && !t.contains("1010"), "{sql} → {t}");
            assert!(t.starts_with("SELECT"), "{sql} → {t}");
        }
    }

    #[test]
    fn lists_collapse_and_whitespace_folds() {
        assert_eq!(
            template("SELECT * FROM t WHERE id IN (1, 2,\n 3 , 4)"),
            "SELECT * FROM t WHERE id IN (?)"
        );
        assert_eq!(
            template("insert into t values (1,'a'),(2,'b'), (3, 'c')"),
            "insert into t values (?)"
        );
        assert_eq!(template("/* hello */ SELECT   1   -- x"), "SELECT ?");
        assert_eq!(
            template("SELECT \"MixedCase\".col FROM \"MixedCase\""),
            "SELECT \"MixedCase\".col FROM \"MixedCase\""
        );
    }

    #[test]
    fn broken_sql_is_never_echoed() {
        assert_eq!(template("SELECT 'unterminated secret"), UNPARSEABLE);
        assert_eq!(template(""), "empty");
    }

    #[test]
    fn operations() {
        assert_eq!(operation(&template("select 1")), "SELECT");
        assert_eq!(
            operation(&template(
                "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x"
            )),
            "INSERT"
        );
        assert_eq!(
            operation(&template(
                "with recursive r(n) as (select 1) select * from r"
            )),
            "SELECT"
        );
        assert_eq!(operation(&template("UPDATE t SET a = 1")), "UPDATE");
        assert_eq!(operation(&template("COPY t FROM STDIN")), "COPY");
        assert_eq!(operation(&template("frobnicate")), "OTHER");
        assert_eq!(operation(UNPARSEABLE), "OTHER");
    }

    #[test]
    fn quoted_identifiers_are_kept_unless_masked() {
        let sql = r#"SELECT "e-mail" FROM "Customers of ACME" WHERE id = 1"#;
        assert_eq!(
            template_with(sql, false),
            r#"SELECT "e-mail" FROM "Customers of ACME" WHERE id = ?"#
        );
        assert_eq!(
            template_with(sql, true),
            r#"SELECT "?" FROM "?" WHERE id = ?"#
        );
        // Unquoted words are never masked: they are the statement's shape.
        assert_eq!(template_with("SELECT a FROM t", true), "SELECT a FROM t");
    }
}
