//! The JSON walker: reads a `serde_json::Value` field by field and names
//! every refusal by its path, so that a bad configuration fails with one line
//! `invalid apikeyrouter config: <field path>: <reason>`.
//!
//! [`Obj`] is an object being consumed: each section takes the fields it
//! knows, and [`Obj::finish`] refuses whatever is left as an unknown field.
//! The scalar readers here (`decimal`, [`check_id`]) are the ones several
//! sections share.

use rust_decimal::Decimal;
use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

/// Where a configuration error was found and why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `providers[0].keys[1].weight`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid apikeyrouter config: {}: {}", self.field, self.reason)
    }
}

pub(super) fn err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { field: field.to_string(), reason: reason.into() }
}

/// A non-negative decimal from a JSON string or number.
pub(super) fn decimal(v: &Value) -> Option<Decimal> {
    let d = match v {
        Value::String(s) => Decimal::from_str(s.trim()).ok()?,
        Value::Number(n) => Decimal::from_str(&n.to_string()).ok()?,
        _ => return None,
    };
    (d >= Decimal::ZERO).then_some(d)
}

/// An id: 1-64 characters of A-Z, a-z, 0-9, '-' or '_'.
pub fn check_id(field: &str, s: String) -> Result<String, ConfigError> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(err(field, format!("{s:?} must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'")));
    }
    Ok(s)
}

/// An object being consumed field by field; `finish` rejects leftovers.
pub(super) struct Obj {
    path: String,
    map: Map<String, Value>,
}

impl Obj {
    pub(super) fn new(v: Value, path: &str) -> Result<Obj, ConfigError> {
        let shown = if path.is_empty() { "(root)" } else { path };
        match v {
            Value::Object(map) => Ok(Obj { path: path.to_string(), map }),
            other => Err(err(shown, format!("expected an object, found {}", kind_of(&other)))),
        }
    }

    /// The path of one of this object's fields, for an error.
    pub(super) fn field(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.path, name)
        }
    }

    /// The fields not taken yet, e.g. the entries of a map section.
    pub(super) fn entries(&self) -> serde_json::map::Iter<'_> {
        self.map.iter()
    }

    /// Removes a field; `null` counts as absent.
    pub(super) fn take(&mut self, name: &str) -> Option<Value> {
        match self.map.remove(name) {
            Some(Value::Null) | None => None,
            Some(v) => Some(v),
        }
    }

    pub(super) fn opt_str(&mut self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(err(&self.field(name), format!("expected a string, found {}", kind_of(&other)))),
        }
    }

    pub(super) fn req_id(&mut self, name: &str) -> Result<String, ConfigError> {
        let s = self.opt_str(name)?.ok_or_else(|| err(&self.field(name), "required"))?;
        check_id(&self.field(name), s)
    }

    pub(super) fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(err(&self.field(name), format!("expected true or false, found {}", kind_of(&other)))),
        }
    }

    pub(super) fn opt_u64_in(&mut self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => Err(err(&self.field(name), format!("expected an integer from {min} to {max}, found {n}"))),
            },
            Some(other) => Err(err(
                &self.field(name),
                format!("expected an integer from {min} to {max}, found {}", kind_of(&other)),
            )),
        }
    }

    pub(super) fn opt_f64_in(&mut self, name: &str, min: f64, max: f64) -> Result<Option<f64>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if v >= min && v <= max => Ok(Some(v)),
                _ => Err(err(&self.field(name), format!("expected a number from {min} to {max}, found {n}"))),
            },
            Some(other) => {
                Err(err(&self.field(name), format!("expected a number from {min} to {max}, found {}", kind_of(&other))))
            }
        }
    }

    /// A decimal above zero; `example` shows the expected form.
    pub(super) fn opt_positive_decimal(&mut self, name: &str, example: &str) -> Result<Option<Decimal>, ConfigError> {
        self.take(name)
            .map(|v| {
                decimal(&v).filter(|d| *d > Decimal::ZERO).ok_or_else(|| {
                    err(&self.field(name), format!("expected a positive decimal string, e.g. \"{example}\""))
                })
            })
            .transpose()
    }

    pub(super) fn opt_array(&mut self, name: &str) -> Result<Option<Vec<Value>>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => Err(err(&self.field(name), format!("expected an array, found {}", kind_of(&other)))),
        }
    }

    pub(super) fn req_array(&mut self, name: &str) -> Result<Vec<Value>, ConfigError> {
        match self.take(name) {
            None => Err(err(&self.field(name), "required")),
            Some(Value::Array(a)) => Ok(a),
            Some(other) => Err(err(&self.field(name), format!("expected an array, found {}", kind_of(&other)))),
        }
    }

    pub(super) fn opt_obj(&mut self, name: &str) -> Result<Option<Obj>, ConfigError> {
        let path = self.field(name);
        match self.take(name) {
            None => Ok(None),
            Some(v) => Obj::new(v, &path).map(Some),
        }
    }

    pub(super) fn opt_obj_raw(&mut self, name: &str) -> Result<Option<Map<String, Value>>, ConfigError> {
        Ok(self.opt_obj(name)?.map(|o| o.map))
    }

    /// Refuses the first field no one took.
    pub(super) fn finish(self) -> Result<(), ConfigError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(unknown) => Err(err(&self.field(unknown), "unknown field")),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refusal_is_one_line_naming_the_field_path() {
        let e = err("providers[0].keys[1].weight", "expected an integer from 1 to 10000, found 0");
        assert_eq!(
            e.to_string(),
            "invalid apikeyrouter config: providers[0].keys[1].weight: expected an integer from 1 to 10000, found 0"
        );
    }

    #[test]
    fn nested_objects_name_fields_by_their_path_and_refuse_leftovers() {
        let root = Obj::new(json!({"admin": {"prefix": 7, "extra": true}}), "");
        let Ok(mut root) = root else { panic!("root is an object") };
        let Ok(Some(mut admin)) = root.opt_obj("admin") else { panic!("admin is an object") };
        let e = admin.opt_str("prefix").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("invalid apikeyrouter config: admin.prefix: expected a string, found a number"));
        assert_eq!(admin.finish().err().map(|e| e.field), Some("admin.extra".to_string()));
        assert_eq!(Obj::new(json!([]), "").err().map(|e| e.field), Some("(root)".to_string()));
    }
}
