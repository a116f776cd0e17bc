//! How an error message shows a value it was given: quoted, and cut to its first
//! [`QUOTED_CHARS`] characters with an ellipsis and the value's length when longer, so that a
//! 60 MB CSV cell or header line does not come back as a 60 MB message. Every message that
//! echoes input goes through here; the API also passes every message and field it sends
//! through [`bounded`], for the messages other crates wrote (serde's `unknown variant`).

use std::borrow::Cow;
use std::fmt;

/// The most characters of one input value an error message shows.
pub const QUOTED_CHARS: usize = 200;

/// The longest message [`bounded`] lets through once its quoted values are cut: a few cut
/// values and the sentence around them.
pub const MAX_MESSAGE_CHARS: usize = 2000;

/// `"value"` (escaped as Rust's `{:?}` does), or `"first 200 characters…" (62914560
/// characters)` for a longer value.
pub fn quoted(value: &str) -> Quoted<'_> {
    Quoted(value)
}

pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match cut(self.0, QUOTED_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some(head) => write!(
                f,
                "\"{}…\" ({} characters)",
                head.escape_debug(),
                self.0.chars().count()
            ),
        }
    }
}

/// The value itself when it is short, else its first [`QUOTED_CHARS`] characters and an
/// ellipsis: for an error's `field`, which names something rather than quoting it.
pub fn shortened(value: &str) -> Cow<'_, str> {
    match cut(value, QUOTED_CHARS) {
        None => Cow::Borrowed(value),
        Some(head) => Cow::Owned(format!("{head}…")),
    }
}

/// A message written elsewhere (serde's, a parser's), with every value it quotes between
/// `"` or backticks longer than [`QUOTED_CHARS`] cut as [`quoted`] cuts it, and the whole
/// cut to [`MAX_MESSAGE_CHARS`] characters should it still be longer.
pub fn bounded(message: &str) -> Cow<'_, str> {
    if message.len() <= QUOTED_CHARS {
        return Cow::Borrowed(message);
    }
    let mut out = String::new();
    let mut rest = message;
    while let Some(open) = rest.find(['"', '`']) {
        let delimiter = rest.as_bytes()[open] as char;
        let inside = &rest[open + 1..];
        let Some(close) = closing(inside, delimiter) else {
            break;
        };
        out.push_str(&rest[..open]);
        let value = &inside[..close];
        match cut(value, QUOTED_CHARS).filter(|_| !already_cut(value)) {
            None => {
                out.push(delimiter);
                out.push_str(value);
                out.push(delimiter);
            }
            Some(head) => {
                let head = head.trim_end_matches('\\');
                out.push_str(&format!(
                    "{delimiter}{head}…{delimiter} ({} characters)",
                    value.chars().count()
                ));
            }
        }
        rest = &inside[close + 1..];
    }
    out.push_str(rest);
    match cut(&out, MAX_MESSAGE_CHARS) {
        None => Cow::Owned(out),
        Some(head) => Cow::Owned(format!("{head}… ({} characters)", out.chars().count())),
    }
}

/// Where `delimiter` closes a value that starts `text`: a `"` preceded by a backslash is
/// part of a `{:?}`-escaped value, a backtick has no escape.
fn closing(text: &str, delimiter: char) -> Option<usize> {
    let mut escaped = false;
    for (index, character) in text.char_indices() {
        match character {
            '\\' if delimiter == '"' && !escaped => escaped = true,
            c if c == delimiter && !escaped => return Some(index),
            _ => escaped = false,
        }
    }
    None
}

/// A value [`quoted`] has cut already: its first characters and the ellipsis.
fn already_cut(value: &str) -> bool {
    value.ends_with('…') && value.chars().count() == QUOTED_CHARS + 1
}

/// The first `chars` characters of `text` when it has more, else `None`.
fn cut(text: &str, chars: usize) -> Option<&str> {
    if text.len() <= chars {
        return None;
    }
    text.char_indices()
        .nth(chars)
        .map(|(boundary, _)| &text[..boundary])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_value_is_quoted_whole_and_escaped() {
        assert_eq!(quoted("abc").to_string(), r#""abc""#);
        assert_eq!(quoted("a\"b\n").to_string(), r#""a\"b\n""#);
        assert_eq!(
            quoted(&"é".repeat(200)).to_string(),
            format!("\"{}\"", "é".repeat(200))
        );
    }

    #[test]
    fn a_long_value_shows_its_first_200_characters_an_ellipsis_and_its_length() {
        let value = "a".repeat(62_914_560);
        assert_eq!(
            quoted(&value).to_string(),
            format!("\"{}…\" (62914560 characters)", "a".repeat(200))
        );
        let wide = "é".repeat(201);
        assert_eq!(
            quoted(&wide).to_string(),
            format!("\"{}…\" (201 characters)", "é".repeat(200))
        );
        assert_eq!(shortened(&value), format!("{}…", "a".repeat(200)));
        assert_eq!(shortened("column"), "column");
    }

    #[test]
    fn a_foreign_message_has_its_long_quoted_values_cut_and_its_short_ones_kept() {
        let long = "x".repeat(10_000);
        let message = format!("unknown variant `{long}`, expected `csv` or `text`");
        assert_eq!(
            bounded(&message),
            format!(
                "unknown variant `{}…` (10000 characters), expected `csv` or `text`",
                "x".repeat(200)
            )
        );
        let message = format!(
            "invalid type: string {:?}, expected a number",
            long.clone() + "\""
        );
        assert_eq!(
            bounded(&message),
            format!(
                "invalid type: string \"{}…\" (10002 characters), expected a number",
                "x".repeat(200)
            )
        );
        assert_eq!(bounded("row 3: not a number"), "row 3: not a number");
        // What `quoted` wrote passes unchanged.
        let ours = format!("row 3: {} is not a number", quoted(&long));
        assert_eq!(bounded(&ours), ours);
    }

    #[test]
    fn a_foreign_message_without_quotes_is_cut_as_a_whole() {
        let message = "y".repeat(1_000_000);
        let bounded = bounded(&message);
        assert_eq!(
            bounded,
            format!("{}… (1000000 characters)", "y".repeat(MAX_MESSAGE_CHARS))
        );
    }
}
