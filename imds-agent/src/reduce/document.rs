//! Documents as trees of keys: a JSON object (user data, Azure's, OCI's, DigitalOcean's and
//! OpenStack's documents) or a YAML mapping (Hetzner's metadata). Keys keep their order.

use serde_json::{Map, Value};

/// A parsed document, and how it was written.
pub enum Document {
    Json(Map<String, Value>),
    Yaml(Map<String, Value>),
}

impl Document {
    /// JSON if the text is a JSON object; a YAML mapping only where `yaml` allows it (a
    /// document view: any text is some YAML, so user data is never read as YAML).
    pub fn parse(text: &str, yaml: bool) -> Result<Self, String> {
        if text.trim_start().starts_with('{') {
            return match serde_json::from_str(text) {
                Ok(Value::Object(map)) => Ok(Self::Json(map)),
                Ok(_) => Err("not a JSON object".into()),
                Err(error) => Err(format!("not valid JSON: {error}")),
            };
        }
        if !yaml {
            return Err("not a JSON object".into());
        }
        match serde_saphyr::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok(Self::Yaml(map)),
            Ok(_) => Err("neither a JSON object nor a YAML mapping".into()),
            Err(error) => Err(format!("not valid YAML: {error}")),
        }
    }

    pub fn map(&mut self) -> &mut Map<String, Value> {
        match self {
            Self::Json(map) | Self::Yaml(map) => map,
        }
    }

    /// The document written as it came (JSON compact, with the original's final line break).
    pub fn write(&self, newline: bool) -> Result<String, String> {
        let mut out = match self {
            Self::Json(map) => serde_json::to_string(map).map_err(|e| e.to_string())?,
            Self::Yaml(map) => serde_saphyr::to_string(map).map_err(|e| e.to_string())?,
        };
        if newline && !out.ends_with('\n') {
            out.push('\n');
        }
        Ok(out)
    }
}

/// Removes the field at `path` (keys, object within object); whether it was there.
pub fn remove(map: &mut Map<String, Value>, path: &[String]) -> bool {
    match path {
        [] => false,
        [key] => map.shift_remove(key).is_some(),
        [key, rest @ ..] => match map.get_mut(key) {
            Some(Value::Object(inner)) => remove(inner, rest),
            _ => false,
        },
    }
}

/// The parts of `map` that `grants` name (each a dotted path split), in the map's order: a
/// granted key whole, or below it only what longer grants name.
pub fn keep(map: &Map<String, Value>, grants: &[Vec<&str>]) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in map {
        let below: Vec<Vec<&str>> = grants
            .iter()
            .filter(|g| g.first() == Some(&key.as_str()))
            .map(|g| g[1..].to_vec())
            .collect();
        if below.is_empty() {
            continue;
        }
        if below.iter().any(Vec::is_empty) {
            out.insert(key.clone(), value.clone());
        } else if let Value::Object(inner) = value {
            let inner = keep(inner, &below);
            if !inner.is_empty() {
                out.insert(key.clone(), Value::Object(inner));
            }
        }
    }
    out
}

/// Every key path of `map`, dotted (objects within objects; arrays are values).
pub fn key_paths(map: &Map<String, Value>) -> Vec<String> {
    let mut paths = Vec::new();
    for (key, value) in map {
        paths.push(key.clone());
        if let Value::Object(inner) = value {
            paths.extend(key_paths(inner).into_iter().map(|p| format!("{key}.{p}")));
        }
    }
    paths
}
