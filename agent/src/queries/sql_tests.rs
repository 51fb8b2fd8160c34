//! Property tests of the SQL normaliser (`sql`): a template is its own
//! template, is at most [`MAX_TEMPLATE`] bytes and ends with [`CUT_MARK`]
//! when it was cut; no literal and no comment shows in one; a list of
//! constants is one template whatever its length and its values.
//!
//! Statements are drawn from a vocabulary of PostgreSQL's tokens written
//! one after the other with or without whitespace, so that operators meet
//! placeholders, literals, comments and each other with nothing between.
//! Only after a token that ends like a name or a number (`E`, `1`, `$`)
//! is there always a space: the next token would otherwise be another one
//! (`E'…'`, `x$tag$…`), for PostgreSQL as for the normaliser.

use proptest::{prelude::*, sample::select, test_runner::Config};

use super::sql::{CUT_MARK, MAX_TEMPLATE, UNPARSEABLE, template_with};

const KEYWORDS: &[&str] = &[
    "SELECT", "FROM", "WHERE", "IN", "VALUES", "AND", "OR", "NOT", "INSERT", "INTO", "UPDATE",
    "SET", "ARRAY", "CAST", "AS", "int", "text", "NULL", "e", "E", "U", "N", "X", "B",
];
const IDENTIFIERS: &[&str] = &[
    "t",
    "id",
    "aid",
    "pgbench_accounts",
    "t.c",
    "col$x",
    "_x",
    "é",
];
const QUOTED_IDENTIFIERS: &[&str] = &[
    r#""q""#,
    r#""a""b""#,
    r#""&>""#,
    r#""x--y""#,
    r#""/*""#,
    r#""*/*""#,
    r#""a&>--b""#,
    r#""\""""#,
    "\"two\nlines\"",
];
/// Every literal and comment holds `sec`, which no other token does.
const LITERALS: &[&str] = &[
    "'secret'",
    "'it''s secret'",
    r"E'se\'cret'",
    "$$secret$$",
    "$tag$sec'ret$tag$",
    r"U&'secr\0065t'",
    "N'secret'",
    "X'5ec7e7'",
    "B'1010'",
    "42",
    "1.5",
    ".5",
    "1e10",
    "0x1f",
];
const PLACEHOLDERS: &[&str] = &["$1", "$12", "?", "$"];
const OPERATORS: &[&str] = &[
    "&>", "&<", "<@", "@>", "->", "->>", "#>", "#>>", "#-", "::", "=", "<>", "!=", "<", ">", "<=",
    ">=", "||", "|", "&", "&&", "-", "+", "*", "/", "%", "^", "~", "!~", "~*", "?|", "?&", "?-",
    "<->", "<<|", "<|", "|&>", "@?", "@@", "!", "#", "@",
];
const PUNCTUATION: &[&str] = &["(", ")", "[", "]", ",", ";", ".", ":"];
const COMMENTS: &[&str] = &["/* secret */", "-- secret\n", "/* a /* secret */ b */"];
const SPACES: &[&str] = &["", "", "", " ", "\n", "\t  "];

fn token() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        2 => select(KEYWORDS),
        2 => select(IDENTIFIERS),
        1 => select(QUOTED_IDENTIFIERS),
        2 => select(LITERALS),
        2 => select(PLACEHOLDERS),
        4 => select(OPERATORS),
        3 => select(PUNCTUATION),
        1 => select(COMMENTS),
    ]
}

/// A list of constants, such as an `IN` list, as PostgreSQL's tokens.
fn in_list() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(scalar(), 1..12),
        select(&[",", ", ", " , "][..]),
    )
        .prop_map(|(values, comma)| format!("IN ({})", values.join(comma)))
}

/// SQL-ish text: tokens and `IN` lists, with or without space between.
fn statement(tokens: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        12 => token().prop_map(str::to_owned),
        1 => in_list(),
    ];
    prop::collection::vec((piece, select(SPACES)), tokens).prop_map(|pieces| {
        let mut sql = String::new();
        for (piece, space) in pieces {
            sql.push_str(&piece);
            let last = piece.chars().last().unwrap_or(' ');
            let name_like = last.is_alphanumeric() || matches!(last, '$' | '_');
            sql.push_str(if name_like && space.is_empty() {
                " "
            } else {
                space
            });
        }
        sql
    })
}

/// One constant: a number, a string, a parameter, signed or cast.
fn scalar() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        (0u32..100_000).prop_map(|n| n.to_string()),
        (0u32..1_000).prop_map(|n| format!("{n}.{n}")),
        "[a-z' ]{0,8}".prop_map(|s| format!("'{}'", s.replace('\'', "''"))),
        "[a-z]{0,8}".prop_map(|s| format!("E'{s}\\n'")),
        "[a-z]{0,8}".prop_map(|s| format!("$${s}$$")),
        (1u32..100).prop_map(|n| format!("${n}")),
        Just("?".to_owned()),
    ];
    let sign = select(&["", "", "-", "+", "- "][..]);
    let cast = select(&["", "", "::int", "::text", "::numeric(10, 2)", "::uuid[]"][..]);
    (sign, value, cast).prop_map(|(sign, value, cast)| format!("{sign}{value}{cast}"))
}

proptest! {
    #![proptest_config(Config { cases: 2048, failure_persistence: None, ..Config::default() })]

    #[test]
    fn a_template_is_its_own_template(sql in statement(0..40)) {
        for mask in [false, true] {
            let t = template_with(&sql, mask);
            prop_assert_eq!(&template_with(&t, mask), &t, "mask {}, of {:?}", mask, sql);
            prop_assert!(t.len() <= MAX_TEMPLATE);
        }
    }

    #[test]
    fn no_literal_and_no_comment_shows(sql in statement(0..40)) {
        for mask in [false, true] {
            let t = template_with(&sql, mask);
            prop_assert!(!t.contains("sec"), "mask {}: {:?} of {:?}", mask, t, sql);
        }
    }
}

proptest! {
    #![proptest_config(Config { cases: 256, failure_persistence: None, ..Config::default() })]

    /// Long statements: their templates are cut, marked, within the limit,
    /// and still their own templates.
    #[test]
    fn a_cut_template_is_its_own_template(
        columns in prop::collection::vec(prop::collection::vec(token(), 0..3), 300..400),
        tail in statement(0..40),
    ) {
        // `c0` to `c299` alone take more than the limit; the tokens after
        // each are spaced, so that they open no comment (`/` then `*`).
        let list: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, more)| format!("c{i} {}", more.join(" ")))
            .collect();
        let sql = format!("SELECT {} FROM t {tail}", list.join(", "));
        for mask in [false, true] {
            let t = template_with(&sql, mask);
            prop_assert_eq!(&template_with(&t, mask), &t, "mask {}, of {:?}", mask, sql);
            prop_assert!(t.len() <= MAX_TEMPLATE);
            prop_assert!(t.ends_with(CUT_MARK) || t == UNPARSEABLE, "{:?}", t);
        }
    }

    /// `IN` lists and `VALUES` rows of any length and any constants.
    #[test]
    fn a_list_of_constants_is_one_template(
        values in prop::collection::vec(scalar(), 1..400),
        pairs in prop::collection::vec((scalar(), scalar()), 1..200),
    ) {
        let list = values.join(", ");
        prop_assert_eq!(
            template_with(&format!("SELECT * FROM t WHERE k IN ({list}) AND v = $1"), false),
            "SELECT * FROM t WHERE k IN (?) AND v = ?"
        );
        let tuples: Vec<String> = pairs.iter().map(|(a, b)| format!("({a}, {b})")).collect();
        prop_assert_eq!(
            template_with(&format!("SELECT * FROM t WHERE (a, b) IN ({})", tuples.join(",")), false),
            "SELECT * FROM t WHERE (a, b) IN ((?))"
        );
        prop_assert_eq!(
            template_with(&format!("INSERT INTO t (a, b) VALUES {}", tuples.join(", ")), false),
            "INSERT INTO t (a, b) VALUES (?)"
        );
    }
}
