//! The layers of configuration, merged key by key over the declared defaults: the file (read
//! with the TOML parser's own spans, so an error names its line), then `RAGPOOL_*` variables,
//! then flags. Every value is type- and range-checked against its [`Key`] as it is set, so an
//! error names the layer it came from.
//!
//! This module knows keys only through [`keys::ALL`]; it builds no [`super::Config`] and
//! touches no process state besides reading the file it is given.

use std::path::Path;

use super::error::{suggest, ConfigError, Origin};
use super::keys::{self, Key, Value, ALL};

/// Every key's effective value and where it came from, in the order of [`keys::ALL`]; and the
/// tables of each array of tables ([`keys::ARRAYS`]), each a full set of its keys' values.
#[derive(Debug, Clone)]
pub struct Values {
    entries: Vec<(Value, Origin)>,
    /// `[[llm.backend]]` and its like, in file order: the array's key table (`"llm.backend"`)
    /// and one table's values, indexed like [`keys::ALL`] (keys of other tables at default).
    arrays: Vec<(&'static str, Values)>,
}

/// Two configurations are the same when their values are, wherever they came from.
impl PartialEq for Values {
    fn eq(&self, other: &Values) -> bool {
        self.entries
            .iter()
            .zip(&other.entries)
            .all(|((a, _), (b, _))| a == b)
            && self.arrays.len() == other.arrays.len()
            && self
                .arrays
                .iter()
                .zip(&other.arrays)
                .all(|((ta, a), (tb, b))| ta == tb && a == b)
    }
}

impl Default for Values {
    fn default() -> Values {
        Values {
            entries: ALL
                .iter()
                .map(|k| (k.kind.default_value(), Origin::Default))
                .collect(),
            arrays: Vec::new(),
        }
    }
}

fn index(key: &Key) -> usize {
    ALL.iter()
        .position(|k| k.table == key.table && k.name == key.name)
        .unwrap_or_else(|| unreachable!("{} is not in keys::ALL", key.path()))
}

impl Values {
    /// Sets an already checked value.
    fn set(&mut self, key: &Key, value: Value, origin: Origin) {
        self.entries[index(key)] = (value, origin);
    }

    pub fn get(&self, key: &Key) -> &Value {
        &self.entries[index(key)].0
    }

    pub fn origin(&self, key: &Key) -> &Origin {
        &self.entries[index(key)].1
    }

    /// Every key with its value and origin, in declaration order (keys of arrays of tables
    /// are in [`Values::array`] instead).
    pub fn iter(&self) -> impl Iterator<Item = (&'static Key, &Value, &Origin)> {
        ALL.iter()
            .zip(&self.entries)
            .filter(|(k, _)| !k.in_array())
            .map(|(k, (v, o))| (k, v, o))
    }

    /// The tables of the array of tables whose keys are declared in `table` (`"llm.backend"`),
    /// in file order; read each with the usual getters and that table's keys.
    pub fn array(&self, table: &str) -> impl Iterator<Item = &Values> {
        let table = table.to_string();
        self.arrays
            .iter()
            .filter(move |(t, _)| *t == table)
            .map(|(_, v)| v)
    }

    /// An error about `key`, pointing at where its value came from.
    pub fn invalid(&self, key: &Key, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin(key).clone(),
            key: key.path(),
            message: message.into(),
        }
    }

    pub fn int(&self, key: &Key) -> i64 {
        match self.get(key) {
            Value::Int(i) => *i,
            other => unreachable!("{} holds {other:?}", key.path()),
        }
    }

    pub fn float(&self, key: &Key) -> f64 {
        match self.get(key) {
            Value::Float(f) => *f,
            other => unreachable!("{} holds {other:?}", key.path()),
        }
    }

    pub fn seconds(&self, key: &Key) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.float(key))
    }

    pub fn flag(&self, key: &Key) -> bool {
        match self.get(key) {
            Value::Bool(b) => *b,
            other => unreachable!("{} holds {other:?}", key.path()),
        }
    }

    pub fn text(&self, key: &Key) -> &str {
        match self.get(key) {
            Value::Text(s) => s,
            other => unreachable!("{} holds {other:?}", key.path()),
        }
    }

    /// The text, or `None` when it is blank (`pidfile = ""` means no pidfile).
    pub fn optional(&self, key: &Key) -> Option<String> {
        let s = self.text(key);
        (!s.trim().is_empty()).then(|| s.to_string())
    }

    /// The text, or the declared default when it is blank (`model = ""` means the default).
    pub fn text_or_default(&self, key: &Key) -> String {
        match self.optional(key) {
            Some(s) => s,
            None => match key.kind.default_value() {
                Value::Text(s) => s,
                other => unreachable!("{} defaults to {other:?}", key.path()),
            },
        }
    }

    pub fn list(&self, key: &Key) -> &[String] {
        match self.get(key) {
            Value::List(items) => items,
            other => unreachable!("{} holds {other:?}", key.path()),
        }
    }
}

/// Reads a TOML document over `values`. Errors carry the line of the offending key, from the
/// parser's spans. A document that sets no key at all is refused: an editor's truncated file
/// must not turn into "all defaults" on a reload.
pub fn apply_file(values: &mut Values, path: &Path, doc: &str) -> Result<(), ConfigError> {
    let origin = |span: Option<std::ops::Range<usize>>| Origin::File {
        path: path.to_path_buf(),
        line: span.map(|s| line_at(doc, s.start)),
    };
    let parsed = toml_edit::ImDocument::parse(doc).map_err(|e| ConfigError::Syntax {
        origin: origin(e.span()),
        // The parser's message may span lines ("invalid string\nexpected `\"`"): one log line.
        message: e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
    })?;
    let tables = keys::tables();
    let mut set = 0;
    for (name, item) in parsed.iter() {
        let key_span = parsed.key(name).and_then(toml_edit::Key::span);
        if tables.contains(&name) {
            let Some(table) = item.as_table_like() else {
                return Err(ConfigError::Invalid {
                    origin: origin(key_span.or_else(|| item.span())),
                    key: name.to_string(),
                    message: format!("expected a table [{name}]"),
                });
            };
            for (inner, item) in table.iter() {
                let span = table
                    .key(inner)
                    .and_then(toml_edit::Key::span)
                    .or_else(|| item.span());
                if keys::ARRAYS.contains(&(name, inner)) {
                    let array = format!("{name}.{inner}");
                    let array = ALL
                        .iter()
                        .find(|k| k.table == array)
                        .map(|k| k.table)
                        .unwrap_or_else(|| unreachable!("no keys declared for [[{array}]]"));
                    apply_array(values, array, item, &origin, span)?;
                    set += 1;
                    continue;
                }
                let mut known: Vec<&'static str> = ALL
                    .iter()
                    .filter(|k| k.table == name)
                    .map(|k| k.name)
                    .collect();
                known.extend(
                    keys::ARRAYS
                        .iter()
                        .filter(|(t, _)| *t == name)
                        .map(|(_, k)| *k),
                );
                let Some(key) = keys::find(name, inner) else {
                    return Err(ConfigError::UnknownKey {
                        origin: origin(span),
                        key: inner.to_string(),
                        suggestion: suggest(inner, &known),
                    });
                };
                set_from_item(values, key, item, origin(span))?;
                set += 1;
            }
            continue;
        }
        let span = key_span.or_else(|| item.span());
        let Some(key) = keys::find("", name) else {
            let known: Vec<&'static str> = ALL
                .iter()
                .filter(|k| k.table.is_empty())
                .map(|k| k.name)
                .chain(tables.iter().copied())
                .collect();
            return Err(ConfigError::UnknownKey {
                origin: origin(span),
                key: name.to_string(),
                suggestion: suggest(name, &known),
            });
        };
        set_from_item(values, key, item, origin(span))?;
        set += 1;
    }
    if set == 0 {
        return Err(ConfigError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// `[[llm.backend]]` tables (or `backend = [{ ... }, ...]`): each one a set of the keys of
/// `array` (the array's key table), checked like any other key; unknown keys are refused.
fn apply_array(
    values: &mut Values,
    array: &'static str,
    item: &toml_edit::Item,
    origin: &impl Fn(Option<std::ops::Range<usize>>) -> Origin,
    span: Option<std::ops::Range<usize>>,
) -> Result<(), ConfigError> {
    let tables: Vec<&dyn toml_edit::TableLike> = match item {
        toml_edit::Item::ArrayOfTables(tables) => tables
            .iter()
            .map(|t| t as &dyn toml_edit::TableLike)
            .collect(),
        toml_edit::Item::Value(toml_edit::Value::Array(items)) => items
            .iter()
            .map(|v| v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ConfigError::Invalid {
                origin: origin(span.clone()),
                key: array.to_string(),
                message: format!("expected tables [[{array}]]"),
            })?,
        _ => {
            return Err(ConfigError::Invalid {
                origin: origin(span),
                key: array.to_string(),
                message: format!("expected tables [[{array}]]"),
            })
        }
    };
    values.arrays.retain(|(t, _)| *t != array);
    let known: Vec<&'static str> = ALL
        .iter()
        .filter(|k| k.table == array)
        .map(|k| k.name)
        .collect();
    for table in tables {
        let mut entry = Values::default();
        for (inner, item) in table.iter() {
            let span = table
                .key(inner)
                .and_then(toml_edit::Key::span)
                .or_else(|| item.span());
            let Some(key) = keys::find(array, inner) else {
                return Err(ConfigError::UnknownKey {
                    origin: origin(span),
                    key: inner.to_string(),
                    suggestion: suggest(inner, &known),
                });
            };
            set_from_item(&mut entry, key, item, origin(span))?;
        }
        values.arrays.push((array, entry));
    }
    Ok(())
}

fn set_from_item(
    values: &mut Values,
    key: &Key,
    item: &toml_edit::Item,
    origin: Origin,
) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        origin: origin.clone(),
        key: key.path(),
        message,
    };
    let value = match item.as_value() {
        Some(value) => key.kind.convert(value).map_err(invalid)?,
        None => {
            return Err(invalid(format!(
                "expected {}, found a table",
                key.kind.describe()
            )))
        }
    };
    values.set(key, value, origin);
    Ok(())
}

/// `RAGPOOL_<KEY>` and `RAGPOOL_<TABLE>__<KEY>` for every declared key.
pub fn apply_env(
    values: &mut Values,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for key in ALL.iter().filter(|k| !k.in_array()) {
        let var = key.env_var();
        if let Some(text) = env(&var) {
            apply_text(values, key, &text, Origin::Env(var))?;
        }
    }
    Ok(())
}

/// One key given as text (an environment variable or a command-line flag).
pub fn apply_text(
    values: &mut Values,
    key: &Key,
    text: &str,
    origin: Origin,
) -> Result<(), ConfigError> {
    let value = key
        .kind
        .convert_text(text)
        .map_err(|message| ConfigError::Invalid {
            origin: origin.clone(),
            key: key.path(),
            message,
        })?;
    values.set(key, value, origin);
    Ok(())
}

/// A list given by repeated flags (`--bind A --bind B`).
pub fn apply_list(
    values: &mut Values,
    key: &Key,
    items: &[String],
    origin: Origin,
) -> Result<(), ConfigError> {
    let array: toml_edit::Array = items.iter().map(String::as_str).collect();
    let value = key
        .kind
        .convert(&toml_edit::Value::Array(array))
        .map_err(|message| ConfigError::Invalid {
            origin: origin.clone(),
            key: key.path(),
            message,
        })?;
    values.set(key, value, origin);
    Ok(())
}

fn line_at(doc: &str, offset: usize) -> usize {
    doc.as_bytes()[..offset.min(doc.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}
