//! The error every check of a spec gives: the field, by its path, and what to change.

use std::fmt;

use crate::engine::json::JsonError;
use crate::engine::quote;

/// An invalid spec: which field, and what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A spec that is not JSON, or names a key twice, as an error naming the field.
pub fn json_error(error: JsonError) -> SpecError {
    let message = error.to_string();
    match error {
        JsonError::Syntax(error) => path_error(error),
        JsonError::DuplicateKey { field, .. } => SpecError::new(field, message),
    }
}

/// How a field's own deserializer names it in its message, where serde's path stops at a
/// parent (inside an internally tagged enum): `path_error` appends the name to the path.
pub(super) fn field_prefix(field: &str) -> String {
    format!("field `{field}`: ")
}

/// Turns serde's error into one that names the field by its full path. serde reports an
/// unknown field at the path of its parent, so the field's own name is appended, as is a
/// field named by its own deserializer (`field_prefix`).
pub(super) fn path_error<E: fmt::Display>(error: serde_path_to_error::Error<E>) -> SpecError {
    let mut message = error.inner().to_string();
    let mut field = error.path().to_string();
    if field == "." {
        field.clear();
    }
    if let Some((named, rest)) = message
        .strip_prefix("field `")
        .and_then(|rest| rest.split_once("`: "))
    {
        field = if field.is_empty() {
            named.to_string()
        } else {
            format!("{field}.{named}")
        };
        message = rest.to_string();
    }
    if let Some(unknown) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        let already_named = field == unknown || field.ends_with(&format!(".{unknown}"));
        if !already_named {
            field = if field.is_empty() {
                unknown.to_string()
            } else {
                format!("{field}.{unknown}")
            };
        }
    }
    if field.is_empty() {
        field = "body".to_string();
    }
    // serde_json appends " at line 1 column 7"; the field name says more.
    let message = match message.find(" at line ") {
        Some(position) => &message[..position],
        None => &message,
    };
    // serde quotes the value it was given (`unknown variant `...``) whole.
    SpecError::new(quote::shortened(&field), quote::bounded(message))
}
