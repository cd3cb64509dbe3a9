//! What the admin operations need to know of a platform integrations can be made for. Each
//! source registers one beside its receiver ([`crate::sources::PLATFORMS`]); the admin layer
//! gets the list at construction and never names a platform's settings itself.

use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};

/// An integration's `config` object.
pub type ConfigObject = Map<String, Value>;

/// A platform's part of the integration API.
pub struct Platform {
    /// The integration's `platform` (also its signals' `source`).
    pub name: &'static str,
    /// The webhook URL's path and query up to the integration id (the public URL goes before).
    pub webhook_path: &'static str,
    /// The keys `config` may have.
    pub config_keys: &'static [&'static str],
    /// Checks and normalises a `config` object whose keys are known and not null; errors name
    /// the field.
    pub validate: fn(&ConfigObject) -> ApiResult<ConfigObject>,
}

/// Validates and normalises `config` for `platform`: an object (or absent) whose keys are the
/// platform's, none of them null, then the platform's own rules. Errors name the field.
pub fn validate_config(platform: &Platform, config: Option<&Value>) -> ApiResult<Value> {
    let obj = match config {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(ApiError::invalid("config must be an object")),
    };
    if let Some((k, _)) = obj.iter().find(|(_, v)| v.is_null()) {
        return Err(ApiError::invalid(format!(
            "config.{k} cannot be null: leave it out instead"
        )));
    }
    if let Some(k) = obj
        .keys()
        .find(|k| !platform.config_keys.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(format!(
            "config.{k} is not a {} setting (allowed: {})",
            platform.name,
            platform.config_keys.join(", ")
        )));
    }
    (platform.validate)(&obj).map(Value::Object)
}

/// `cfg[key]` as a list of strings (absent: empty).
pub fn string_list(cfg: &Map<String, Value>, key: &str) -> ApiResult<Vec<String>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(ApiError::invalid(format!(
                    "config.{key}[{i}] must be a non-empty string"
                ))),
            })
            .collect(),
        Some(_) => Err(ApiError::invalid(format!(
            "config.{key} must be an array of strings"
        ))),
    }
}
