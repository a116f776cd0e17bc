//! JSON as users send it (job specs, request bodies, safetensors headers): serde_json's parser,
//! except that a key given twice in one object is refused. serde_json keeps the last value
//! silently, so `{"kind": "compare", "kind": "tune"}` ran a tune.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Why a text is not JSON lrtune accepts.
#[derive(Debug)]
pub enum JsonError {
    /// Not JSON (serde_json's error, with its line and column, and where it was reached).
    Syntax(serde_path_to_error::Error<serde_json::Error>),
    /// An object names `key` twice; `field` is its path (`model.layers[0].type`).
    DuplicateKey { field: String, key: String },
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::Syntax(error) => write!(f, "{}", error.inner()),
            JsonError::DuplicateKey { key, .. } => {
                write!(
                    f,
                    "the key \"{}\" is given twice in one object",
                    key.escape_debug()
                )
            }
        }
    }
}

/// Parses one JSON value (trailing whitespace only), refusing duplicate keys at any depth.
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    let duplicate = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let mut track = serde_path_to_error::Track::new();
    let parsed = NoDuplicates {
        duplicate: &duplicate,
    }
    .deserialize(serde_path_to_error::Deserializer::new(
        &mut deserializer,
        &mut track,
    ));
    let value = match parsed {
        Ok(value) => value,
        Err(error) => {
            return Err(match duplicate.into_inner() {
                Some(key) => {
                    let path = track.path().to_string();
                    let field = if path == "." {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    JsonError::DuplicateKey { field, key }
                }
                None => JsonError::Syntax(serde_path_to_error::Error::new(track.path(), error)),
            })
        }
    };
    deserializer.end().map_err(|error| {
        let root = serde_path_to_error::Track::new().path();
        JsonError::Syntax(serde_path_to_error::Error::new(root, error))
    })?;
    Ok(value)
}

/// Builds a `serde_json::Value` as serde_json's own impl does, noting the first key that an
/// object repeats in `duplicate` (the error itself carries no structured data).
#[derive(Clone, Copy)]
struct NoDuplicates<'a> {
    duplicate: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for NoDuplicates<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDuplicates<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Value, E> {
        // serde_json never yields a non-finite number; `Null` is what its own impl makes of one.
        Ok(serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let message = format!("duplicate key `{key}`");
                *self.duplicate.borrow_mut() = Some(key);
                return Err(de::Error::custom(message));
            }
            let value = map.next_value_seed(self)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duplicate(text: &str) -> (String, String) {
        match parse(text.as_bytes()) {
            Err(JsonError::DuplicateKey { field, key }) => (field, key),
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn a_key_given_twice_is_refused_with_its_path() {
        assert_eq!(
            duplicate(r#"{"kind": "compare", "kind": "tune"}"#),
            ("kind".to_string(), "kind".to_string())
        );
        assert_eq!(
            duplicate(
                r#"{"model": {"arch": "sequential", "layers": [{"type": "relu"}, {"type": "linear", "out": 1, "type": "relu"}]}}"#
            ),
            ("model.layers[1].type".to_string(), "type".to_string())
        );
        assert_eq!(
            duplicate(r#"[1, {"a": {"b": 1, "b": 2}}]"#),
            ("[1].a.b".to_string(), "b".to_string())
        );
        let error = parse(br#"{"kind": 1, "kind": 2}"#).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the key \"kind\" is given twice in one object"
        );
    }

    #[test]
    fn json_without_duplicates_parses_as_serde_json_parses_it() {
        for text in [
            r#"{"a": 1, "b": [1.5, -2, 18446744073709551615, null, true], "c": {"a": "x"}}"#,
            r#"[]"#,
            r#""text""#,
            r#"{"same": {"k": 1}, "other": {"k": 2}}"#,
            "  {\"a\": 0.1}\n",
        ] {
            let want: Value = serde_json::from_str(text).unwrap();
            assert_eq!(parse(text.as_bytes()).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn malformed_json_is_a_syntax_error_as_before() {
        for (text, message) in [
            (
                "{\"data\": ",
                "EOF while parsing a value at line 1 column 9",
            ),
            ("{} {}", "trailing characters at line 1 column 4"),
            ("{\"a\" 1}", "expected `:` at line 1 column 6"),
        ] {
            match parse(text.as_bytes()) {
                Err(JsonError::Syntax(error)) => {
                    assert_eq!(error.inner().to_string(), message, "{text}")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let deep = "[".repeat(100_000);
        assert!(matches!(
            parse(deep.as_bytes()),
            Err(JsonError::Syntax(error))
                if error.inner().to_string().starts_with("recursion limit exceeded")
        ));
    }
}
