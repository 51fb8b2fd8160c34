//! SQL normalisation: the template a statement is reported under, and its
//! operation.
//!
//! **Tokenizer: the `sqlparser` crate's `Tokenizer` with `PostgreSqlDialect`,
//! not a lexer of our own.** Measured against PostgreSQL 15 syntax it gets
//! right every form that decides whether a literal could leak into a label:
//! standard strings with doubled quotes and literal backslashes (`'C:\'`),
//! `E'…'` escape strings, `$$…$$` and `$tag$…$tag$` dollar quoting (with `$$`
//! inside a tagged body), `U&'…'`, `B'…'`, `X'…'`, `N'…'`, nested block
//! comments, `$n` parameters, identifiers containing `$`, quoted identifiers,
//! numbers in every notation (`1e10`, `.5`, `1.5e-3`) and PostgreSQL's
//! operators (`->>`, `#>>`, `@>`, `?|`, `::`, `~*`). Only the tokenizer is
//! used, never the parser: a statement need not be valid, complete, or of a
//! syntax sqlparser knows to be templated. Two places where its PostgreSQL
//! dialect follows psql scripts rather than the server, and what we do:
//!
//! - After `COPY … FROM STDIN;` it takes the following lines as inline COPY
//!   data (psql's convention). The server parses them as SQL, so that text
//!   is normalised again as SQL here; it is never emitted raw.
//! - An unterminated string, dollar quote or comment is an error. Captured
//!   statements can be cut short (a capture prefix, the 16 KiB keep limit),
//!   so the tokens read before the error are kept, the unterminated rest is
//!   dropped, and the template ends in ` …`.
//!
//! Template rules:
//! - every literal (string of any kind, number, bit/hex string) becomes `?`;
//!   a minus sign in front of a number that is not a subtraction goes with it
//!   (`= -5` → `= ?`); `TRUE`, `FALSE` and `NULL` are keywords and stay;
//! - `$1`, `$2`, … also become `?`, so one statement sent through the simple
//!   protocol with literals and through the extended protocol with
//!   parameters (pgbench `-M simple` vs `-M extended`) is one template;
//! - a list made only of `?` after `IN`, `VALUES` or `ARRAY` collapses to
//!   one element (`IN (?)`, `VALUES (?)`, `ARRAY[?]`), and repeated identical
//!   `VALUES` rows collapse to one (`VALUES (?, now())`);
//! - comments are dropped, any run of whitespace or comments becomes one
//!   space (none where the statement had none), trailing `;` are dropped;
//! - the case of keywords and identifiers is kept as sent;
//! - templates longer than [`MAX_TEMPLATE`] bytes are cut at a token
//!   boundary and end in ` …`.

#![cfg_attr(
    not(test),
    expect(dead_code, reason = "wired to the payload capture path next")
)]

use sqlparser::{
    dialect::PostgreSqlDialect,
    keywords::Keyword,
    tokenizer::{Token, TokenWithSpan, Tokenizer, Whitespace},
};

/// Longest template, in bytes (a label value has to stay readable).
pub const MAX_TEMPLATE: usize = 1024;
/// Appended to a template whose statement was cut short or too long.
pub const ELLIPSIS: &str = " …";
/// How deep text after `COPY … FROM STDIN;` is normalised again.
const MAX_REPARSE: usize = 4;

/// What a statement is reported as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Normalized {
    pub template: String,
    pub operation: Operation,
}

/// The kind of statement, from its leading keyword (the `operation` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Copy,
    Begin,
    Commit,
    Rollback,
    Savepoint,
    Release,
    Prepare,
    Execute,
    Deallocate,
    Declare,
    Fetch,
    Move,
    Close,
    Create,
    Alter,
    Drop,
    Truncate,
    Grant,
    Revoke,
    Comment,
    Set,
    Reset,
    Show,
    Explain,
    Analyze,
    Vacuum,
    Call,
    Do,
    Lock,
    Listen,
    Unlisten,
    Notify,
    Discard,
    Refresh,
    Reindex,
    Cluster,
    Checkpoint,
    /// An empty query string (answered by EmptyQueryResponse).
    Empty,
    Other,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Select => "SELECT",
            Self::Insert => "INSERT",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
            Self::Merge => "MERGE",
            Self::Copy => "COPY",
            Self::Begin => "BEGIN",
            Self::Commit => "COMMIT",
            Self::Rollback => "ROLLBACK",
            Self::Savepoint => "SAVEPOINT",
            Self::Release => "RELEASE",
            Self::Prepare => "PREPARE",
            Self::Execute => "EXECUTE",
            Self::Deallocate => "DEALLOCATE",
            Self::Declare => "DECLARE",
            Self::Fetch => "FETCH",
            Self::Move => "MOVE",
            Self::Close => "CLOSE",
            Self::Create => "CREATE",
            Self::Alter => "ALTER",
            Self::Drop => "DROP",
            Self::Truncate => "TRUNCATE",
            Self::Grant => "GRANT",
            Self::Revoke => "REVOKE",
            Self::Comment => "COMMENT",
            Self::Set => "SET",
            Self::Reset => "RESET",
            Self::Show => "SHOW",
            Self::Explain => "EXPLAIN",
            Self::Analyze => "ANALYZE",
            Self::Vacuum => "VACUUM",
            Self::Call => "CALL",
            Self::Do => "DO",
            Self::Lock => "LOCK",
            Self::Listen => "LISTEN",
            Self::Unlisten => "UNLISTEN",
            Self::Notify => "NOTIFY",
            Self::Discard => "DISCARD",
            Self::Refresh => "REFRESH",
            Self::Reindex => "REINDEX",
            Self::Cluster => "CLUSTER",
            Self::Checkpoint => "CHECKPOINT",
            Self::Empty => "EMPTY",
            Self::Other => "OTHER",
        }
    }

    /// The operation a statement starting with `word` performs; `None` for
    /// `WITH`, whose operation is that of the statement after its CTEs.
    fn from_leading(word: &str) -> Option<Self> {
        let upper = word.to_ascii_uppercase();
        Some(match upper.as_str() {
            "SELECT" | "TABLE" | "VALUES" => Self::Select,
            "INSERT" => Self::Insert,
            "UPDATE" => Self::Update,
            "DELETE" => Self::Delete,
            "MERGE" => Self::Merge,
            "COPY" => Self::Copy,
            "BEGIN" | "START" => Self::Begin,
            "COMMIT" | "END" => Self::Commit,
            "ROLLBACK" | "ABORT" => Self::Rollback,
            "SAVEPOINT" => Self::Savepoint,
            "RELEASE" => Self::Release,
            "PREPARE" => Self::Prepare,
            "EXECUTE" => Self::Execute,
            "DEALLOCATE" => Self::Deallocate,
            "DECLARE" => Self::Declare,
            "FETCH" => Self::Fetch,
            "MOVE" => Self::Move,
            "CLOSE" => Self::Close,
            "CREATE" => Self::Create,
            "ALTER" => Self::Alter,
            "DROP" => Self::Drop,
            "TRUNCATE" => Self::Truncate,
            "GRANT" => Self::Grant,
            "REVOKE" => Self::Revoke,
            "COMMENT" => Self::Comment,
            "SET" => Self::Set,
            "RESET" => Self::Reset,
            "SHOW" => Self::Show,
            "EXPLAIN" => Self::Explain,
            "ANALYZE" | "ANALYSE" => Self::Analyze,
            "VACUUM" => Self::Vacuum,
            "CALL" => Self::Call,
            "DO" => Self::Do,
            "LOCK" => Self::Lock,
            "LISTEN" => Self::Listen,
            "UNLISTEN" => Self::Unlisten,
            "NOTIFY" => Self::Notify,
            "DISCARD" => Self::Discard,
            "REFRESH" => Self::Refresh,
            "REINDEX" => Self::Reindex,
            "CLUSTER" => Self::Cluster,
            "CHECKPOINT" => Self::Checkpoint,
            "WITH" => return None,
            _ => Self::Other,
        })
    }
}

/// One piece of a template being built.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    /// A literal or parameter, rendered `?`.
    Param,
    /// A word (keyword or identifier), rendered as sent.
    Word { text: String, keyword: Keyword },
    /// Anything else, rendered as sent.
    Punct(String),
}

impl Piece {
    fn is(&self, s: &str) -> bool {
        matches!(self, Self::Punct(p) if p == s)
    }

    fn is_keyword(&self, k: Keyword) -> bool {
        matches!(self, Self::Word { keyword, .. } if *keyword == k)
    }

    fn text(&self) -> &str {
        match self {
            Self::Param => "?",
            Self::Word { text, .. } => text,
            Self::Punct(p) => p,
        }
    }
}

/// A piece and whether whitespace (or a comment) preceded it.
type Spaced = (bool, Piece);

/// Normalises one statement (or several separated by `;`). `cut_short` says
/// the text is a prefix of the statement sent; the template then ends in ` …`.
pub fn normalize(sql: &str, cut_short: bool) -> Normalized {
    let mut pieces = Vec::new();
    let complete = tokenize_into(sql, &mut pieces, 0);
    let operation = classify(&pieces);
    collapse_lists(&mut pieces);
    while matches!(pieces.last(), Some((_, p)) if p.is(";")) {
        pieces.pop();
    }
    let mut template = String::with_capacity(sql.len().min(MAX_TEMPLATE));
    let mut cut = cut_short || !complete;
    for (i, (space, piece)) in pieces.iter().enumerate() {
        let text = piece.text();
        let sep = usize::from(*space && i > 0);
        if template.len() + sep + text.len() > MAX_TEMPLATE - ELLIPSIS.len() {
            cut = true;
            break;
        }
        if sep == 1 {
            template.push(' ');
        }
        template.push_str(text);
    }
    if cut {
        template.push_str(ELLIPSIS);
    }
    let operation = if pieces.is_empty() && complete && !cut_short {
        Operation::Empty
    } else {
        operation
    };
    Normalized {
        template,
        operation,
    }
}

/// Tokenizes `sql` and appends its pieces, literals already replaced.
/// Returns false when the text ended inside a token (it was cut short).
fn tokenize_into(sql: &str, out: &mut Vec<Spaced>, depth: usize) -> bool {
    let dialect = PostgreSqlDialect {};
    let mut tokens: Vec<TokenWithSpan> = Vec::new();
    let complete = Tokenizer::new(&dialect, sql)
        .with_unescape(false)
        .tokenize_with_location_into_buf(&mut tokens)
        .is_ok();
    let mut space = !out.is_empty();
    let mut complete_rest = true;
    // The tokenizer emits the "data" (the lines after the one ending the
    // COPY) before that line's `;` and the rest of the line; put it back in
    // place, after the line end.
    let mut after_copy: Option<String> = None;
    for t in tokens {
        let piece = match t.token {
            Token::Whitespace(w) => {
                if matches!(w, Whitespace::Newline) {
                    reparse(after_copy.take(), out, depth, &mut complete_rest);
                }
                space = true;
                continue;
            }
            Token::EOF => continue,
            Token::CopyData { data, .. } => {
                after_copy = Some(data);
                continue;
            }
            Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
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
            | Token::Placeholder(_) => {
                // `'a' 'b'` on two lines is one literal in PostgreSQL.
                if matches!(out.last(), Some((_, Piece::Param))) && is_string(&t.token) {
                    space = false;
                    continue;
                }
                if is_number(&t.token) && unary_minus_before(out) {
                    let (minus_space, _) = out.pop().expect("checked by unary_minus_before");
                    space = minus_space;
                }
                Piece::Param
            }
            Token::Word(w) if w.quote_style.is_none() => Piece::Word {
                text: w.value,
                keyword: w.keyword,
            },
            other => Piece::Punct(other.to_string()),
        };
        out.push((space, piece));
        space = false;
    }
    reparse(after_copy, out, depth, &mut complete_rest);
    complete && complete_rest
}

/// Normalises, as SQL, what the tokenizer took for inline COPY data.
fn reparse(data: Option<String>, out: &mut Vec<Spaced>, depth: usize, complete: &mut bool) {
    let Some(data) = data else {
        return;
    };
    if depth < MAX_REPARSE {
        let before = out.len();
        *complete &= tokenize_into(&data, out, depth + 1);
        if out.len() > before {
            out[before].0 = true;
        }
    } else {
        out.push((true, Piece::Param));
    }
}

fn is_string(t: &Token) -> bool {
    !matches!(t, Token::Number(..) | Token::Placeholder(_))
}

fn is_number(t: &Token) -> bool {
    matches!(t, Token::Number(..))
}

/// Whether the last piece is a `-` that is a sign, not a subtraction: it
/// follows nothing, an operator, an opening bracket, a comma or a keyword
/// that an operand cannot end with.
fn unary_minus_before(out: &[Spaced]) -> bool {
    let Some((_, last)) = out.last() else {
        return false;
    };
    if !last.is("-") {
        return false;
    }
    match out.len().checked_sub(2).map(|i| &out[i].1) {
        None => true,
        Some(Piece::Param) => false,
        Some(Piece::Punct(p)) => !matches!(p.as_str(), ")" | "]"),
        Some(Piece::Word { keyword, .. }) => matches!(
            keyword,
            Keyword::SELECT
                | Keyword::WHERE
                | Keyword::AND
                | Keyword::OR
                | Keyword::NOT
                | Keyword::WHEN
                | Keyword::THEN
                | Keyword::ELSE
                | Keyword::BY
                | Keyword::LIMIT
                | Keyword::OFFSET
                | Keyword::VALUES
                | Keyword::IN
                | Keyword::BETWEEN
                | Keyword::LIKE
                | Keyword::IS
                | Keyword::RETURN
                | Keyword::RETURNING
                | Keyword::HAVING
                | Keyword::ON
                | Keyword::SET
        ),
    }
}

/// The operation of the first statement: its leading keyword, looking past
/// opening parentheses and past the CTEs of a `WITH`.
fn classify(pieces: &[Spaced]) -> Operation {
    let mut i = 0;
    while i < pieces.len() {
        match &pieces[i].1 {
            Piece::Punct(p) if p == "(" || p == ";" => i += 1,
            Piece::Word { text, .. } => match Operation::from_leading(text) {
                Some(op) => return op,
                None => match skip_ctes(pieces, i + 1) {
                    Some(next) => i = next,
                    None => return Operation::Other,
                },
            },
            _ => return Operation::Other,
        }
    }
    Operation::Other
}

/// From just after `WITH`, the index of the statement after the CTE list:
/// `[RECURSIVE] name [(cols)] AS [[NOT] MATERIALIZED] ( … ) [, …]`.
fn skip_ctes(pieces: &[Spaced], mut i: usize) -> Option<usize> {
    if pieces.get(i)?.1.is_keyword(Keyword::RECURSIVE) {
        i += 1;
    }
    loop {
        // The name, and optionally its column list.
        i += 1;
        if pieces.get(i)?.1.is("(") {
            i = skip_group(pieces, i)?;
        }
        if !pieces.get(i)?.1.is_keyword(Keyword::AS) {
            return None;
        }
        i += 1;
        if pieces.get(i)?.1.is_keyword(Keyword::NOT) {
            i += 1;
        }
        if pieces.get(i)?.1.is_keyword(Keyword::MATERIALIZED) {
            i += 1;
        }
        if !pieces.get(i)?.1.is("(") {
            return None;
        }
        i = skip_group(pieces, i)?;
        // `SEARCH …` / `CYCLE …` clauses end at the next comma or statement.
        if pieces.get(i)?.1.is(",") {
            i += 1;
            continue;
        }
        return Some(i);
    }
}

/// From an opening bracket, the index just past its matching close.
fn skip_group(pieces: &[Spaced], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, (_, p)) in pieces.iter().enumerate().skip(open) {
        if p.is("(") || p.is("[") {
            depth += 1;
        } else if p.is(")") || p.is("]") {
            depth = depth.checked_sub(1)?;
            if depth == 0 {
                return Some(i + 1);
            }
        }
    }
    None
}

/// Whether `pieces[open..close]` is a bracketed list of only `?` (nested
/// lists of only `?` included).
fn only_params(pieces: &[Spaced]) -> bool {
    let inner = &pieces[1..pieces.len() - 1];
    !inner.is_empty()
        && inner.iter().all(|(_, p)| {
            matches!(p, Piece::Param)
                || p.is(",")
                || p.is("(")
                || p.is(")")
                || p.is("[")
                || p.is("]")
        })
        && inner.iter().any(|(_, p)| matches!(p, Piece::Param))
}

/// `IN (?, ?)` → `IN (?)`, `ARRAY[?, ?]` → `ARRAY[?]`, and the rows of a
/// `VALUES` list: each all-`?` row becomes `(?)`, repeats of a row go.
fn collapse_lists(pieces: &mut Vec<Spaced>) {
    let mut out: Vec<Spaced> = Vec::with_capacity(pieces.len());
    let mut i = 0;
    while i < pieces.len() {
        let (space, piece) = pieces[i].clone();
        let after_in = piece.is_keyword(Keyword::IN) || piece.is_keyword(Keyword::ARRAY);
        let after_values = piece.is_keyword(Keyword::VALUES);
        out.push((space, piece));
        i += 1;
        if !(after_in || after_values) {
            continue;
        }
        let Some((open_space, open)) = pieces.get(i).cloned() else {
            break;
        };
        if !(open.is("(") || open.is("[")) {
            continue;
        }
        let Some(end) = skip_group(pieces, i) else {
            continue;
        };
        let group = collapse_group(&pieces[i..end], open_space);
        if after_in {
            out.extend(group);
            i = end;
            continue;
        }
        // VALUES: rows separated by commas; drop each row equal to the last.
        let mut last = group.clone();
        out.extend(group);
        i = end;
        while i + 1 < pieces.len() && pieces[i].1.is(",") && pieces[i + 1].1.is("(") {
            let Some(end) = skip_group(pieces, i + 1) else {
                break;
            };
            let row = collapse_group(&pieces[i + 1..end], pieces[i + 1].0);
            let same = row.len() == last.len() && row.iter().zip(&last).all(|(a, b)| a.1 == b.1);
            if !same {
                out.push(pieces[i].clone());
                out.extend(row.iter().cloned());
                last = row;
            }
            i = end;
        }
    }
    *pieces = out;
}

/// A bracketed group, as `(?)` / `[?]` if it holds only parameters.
fn collapse_group(group: &[Spaced], open_space: bool) -> Vec<Spaced> {
    if only_params(group) {
        let close = if group[0].1.is("(") { ")" } else { "]" };
        vec![
            (open_space, group[0].1.clone()),
            (false, Piece::Param),
            (false, Piece::Punct(close.to_owned())),
        ]
    } else {
        group.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(sql: &str) -> String {
        normalize(sql, false).template
    }

    fn op(sql: &str) -> &'static str {
        normalize(sql, false).operation.as_str()
    }

    #[test]
    fn literals_of_every_kind_become_placeholders() {
        assert_eq!(
            t("SELECT 'a''b', E'it\\'s', $$x 'y'$$, $q$ $$ $q$, U&'d\\0061', B'01', X'1F', N'n'"),
            "SELECT ?, ?, ?, ?, ?, ?, ?, ?"
        );
        assert_eq!(t("SELECT 1, 1.5, .5, 1e10, 1.5e-3"), "SELECT ?, ?, ?, ?, ?");
        assert_eq!(
            t("SELECT 'C:\\', 'secret@example.com'"),
            "SELECT ?, ?",
            "a backslash does not escape in a standard string"
        );
        assert_eq!(
            t("SELECT interval '1 day', date '2020-01-01', TRUE, FALSE, NULL"),
            "SELECT interval ?, date ?, TRUE, FALSE, NULL"
        );
        assert_eq!(t("SELECT 'a'\n'b'"), "SELECT ?");
    }

    #[test]
    fn parameters_and_literals_give_one_template() {
        let simple = t("SELECT abalance FROM pgbench_accounts WHERE aid = 45417;");
        let extended = t("SELECT abalance FROM pgbench_accounts WHERE aid = $1;");
        assert_eq!(
            simple,
            "SELECT abalance FROM pgbench_accounts WHERE aid = ?"
        );
        assert_eq!(simple, extended);
    }

    #[test]
    fn signs_go_with_numbers_but_subtraction_stays() {
        assert_eq!(
            t("SELECT -5, a - 1, f(-2), x = -3"),
            "SELECT ?, a - ?, f(?), x = ?"
        );
        assert_eq!(
            t("UPDATE t SET a = a -1 WHERE b < -1"),
            "UPDATE t SET a = a -? WHERE b < ?"
        );
    }

    #[test]
    fn lists_collapse() {
        assert_eq!(
            t("SELECT * FROM t WHERE id IN (1, 2, 3)"),
            "SELECT * FROM t WHERE id IN (?)"
        );
        assert_eq!(
            t("SELECT * FROM t WHERE id IN ($1,$2)"),
            "SELECT * FROM t WHERE id IN (?)"
        );
        assert_eq!(
            t("SELECT * FROM t WHERE id IN (SELECT 1)"),
            "SELECT * FROM t WHERE id IN (SELECT ?)"
        );
        assert_eq!(
            t("INSERT INTO t VALUES (1, 'a'), (2, 'b'),(3, 'c')"),
            "INSERT INTO t VALUES (?)"
        );
        assert_eq!(
            t("INSERT INTO t VALUES (1, now()), (2, now()) RETURNING id"),
            "INSERT INTO t VALUES (?, now()) RETURNING id"
        );
        assert_eq!(t("SELECT ARRAY[1, 2, 3]"), "SELECT ARRAY[?]");
        assert_eq!(
            t("SELECT * FROM t WHERE (a, b) IN ((1, 2), (3, 4))"),
            "SELECT * FROM t WHERE (a, b) IN (?)"
        );
    }

    #[test]
    fn comments_and_whitespace_fold() {
        assert_eq!(
            t("/* lead */ SELECT  a,\n\t b -- why\nFROM t /* a /* nested */ one */ WHERE c = 1;;"),
            "SELECT a, b FROM t WHERE c = ?"
        );
        assert_eq!(t("  "), "");
        assert_eq!(normalize("", false).operation, Operation::Empty);
        assert_eq!(
            normalize("-- only a comment", false).operation,
            Operation::Empty
        );
    }

    #[test]
    fn identifiers_and_operators_are_kept() {
        assert_eq!(
            t(r#"SELECT "Weird""Name", a->>'k', b @> '{}', c::int, foo$bar FROM "T""#),
            r#"SELECT "Weird""Name", a->>?, b @> ?, c::int, foo$bar FROM "T""#
        );
    }

    #[test]
    fn cut_statements_never_leak_the_unterminated_literal() {
        for sql in [
            "SELECT * FROM users WHERE email = 'alice@exam",
            "SELECT $tag$ secret",
            "SELECT E'secret\\",
            "SELECT 1 /* secret",
        ] {
            let n = normalize(sql, true);
            assert!(
                !n.template.contains("secret") && !n.template.contains("alice"),
                "{n:?}"
            );
            assert!(n.template.ends_with(ELLIPSIS), "{n:?}");
            assert_eq!(n.operation, Operation::Select);
        }
        assert_eq!(
            normalize("SELECT * FROM users WHERE email = 'alice@exam", false).template,
            "SELECT * FROM users WHERE email = …"
        );
    }

    #[test]
    fn text_after_copy_from_stdin_is_sql_on_the_wire() {
        let n = normalize("COPY t FROM STDIN;\nSELECT 'secret', 42", false);
        assert_eq!(n.template, "COPY t FROM STDIN; SELECT ?, ?");
        let n = normalize(
            "COPY t FROM STDIN; SELECT 1 -- same line\nSELECT 'secret'\n\\.\nSELECT 3",
            false,
        );
        assert_eq!(n.template, "COPY t FROM STDIN; SELECT ? SELECT ? SELECT ?");
        assert_eq!(n.operation, Operation::Copy);
    }

    #[test]
    fn long_templates_are_cut_at_a_token() {
        let sql = format!("SELECT {} FROM t", vec!["column_name"; 500].join(", "));
        let n = t(&sql);
        assert!(n.len() <= MAX_TEMPLATE, "{}", n.len());
        assert!(n.ends_with(ELLIPSIS) && n.starts_with("SELECT column_name, column_name"));
    }

    #[test]
    fn operations() {
        assert_eq!(op("select 1"), "SELECT");
        assert_eq!(op("(SELECT 1) UNION (SELECT 2)"), "SELECT");
        assert_eq!(op("WITH d AS (SELECT 1 AS x) SELECT x FROM d"), "SELECT");
        assert_eq!(
            op(
                "WITH RECURSIVE r(n) AS (VALUES (1) UNION SELECT n+1 FROM r), m AS MATERIALIZED (SELECT 2) INSERT INTO t SELECT * FROM r"
            ),
            "INSERT"
        );
        assert_eq!(
            op("WITH u AS (UPDATE t SET a = 1 RETURNING *) DELETE FROM s"),
            "DELETE"
        );
        assert_eq!(op("INSERT INTO t VALUES (1)"), "INSERT");
        assert_eq!(op("update t set a = 1"), "UPDATE");
        assert_eq!(op("DELETE FROM t"), "DELETE");
        assert_eq!(op("START TRANSACTION"), "BEGIN");
        assert_eq!(op("end"), "COMMIT");
        assert_eq!(op("COPY t TO STDOUT"), "COPY");
        assert_eq!(op("DO $$ BEGIN END $$"), "DO");
        assert_eq!(op("TABLE t"), "SELECT");
        assert_eq!(op("frobnicate"), "OTHER");
        assert_eq!(op("42"), "OTHER");
        assert_eq!(op("SELECT 1; INSERT INTO t VALUES (1)"), "SELECT");
    }
}
