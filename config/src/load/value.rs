//! A YAML document as the JSON value Kubernetes would see: kubectl converts YAML to JSON before anything
//! reads it, so mapping keys that are numbers or booleans become strings (`portLevelMtls: {8080: …}`),
//! and `<<` merge keys are applied. Reading is bounded: collections nested deeper than [`MAX_DEPTH`] and
//! more nodes than a budget proportional to the text (aliases can replay a subtree many times over) stop
//! it before anything larger is built.
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::MAX_DEPTH;

/// Nodes allowed per byte of document text: without aliases a document has fewer nodes than bytes.
const NODES_PER_BYTE: usize = 4;
const MIN_NODES: usize = 4096;

/// What reading one document may still spend, and which limit stopped it, if one did.
pub(super) struct Budget {
    depth: usize,
    nodes_left: usize,
    pub exceeded: Option<String>,
}

impl Budget {
    pub fn for_text(len: usize) -> Self {
        Budget { depth: 0, nodes_left: len.saturating_mul(NODES_PER_BYTE).max(MIN_NODES), exceeded: None }
    }

    /// Reads one document of a serde_yaml stream.
    pub fn read<'de, D: de::Deserializer<'de>>(&mut self, document: D) -> Result<Value, D::Error> {
        Node(self).deserialize(document)
    }

    fn exceed<E: de::Error>(&mut self, what: String) -> E {
        let error = E::custom(&what);
        self.exceeded = Some(what);
        error
    }

    fn enter<E: de::Error>(&mut self) -> Result<(), E> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.exceed(format!("collections nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }
}

struct Node<'a>(&'a mut Budget);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        match self.0.nodes_left.checked_sub(1) {
            Some(left) => self.0.nodes_left = left,
            None => return Err(self.0.exceed("more values than the document's size allows (aliases repeat too much)".into())),
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom(format!("{v} is not a number JSON (and so Kubernetes) can hold")))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.into()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let budget = self.0;
        budget.enter()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Node(&mut *budget))? {
            items.push(item);
        }
        budget.depth -= 1;
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let budget = self.0;
        budget.enter()?;
        let mut out = Map::new();
        let mut merge = None;
        while let Some(key) = map.next_key_seed(Key)? {
            let value = map.next_value_seed(Node(&mut *budget))?;
            if key == "<<" {
                merge = Some(value);
            } else if out.insert(key.clone(), value).is_some() {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
        }
        if let Some(merged) = merge {
            apply_merge(&mut out, merged)?;
        }
        budget.depth -= 1;
        Ok(Value::Object(out))
    }

    /// serde_yaml presents a node with a tag it does not know (`!foo x`) as an enum.
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        let (tag, _): (String, _) = data.variant()?;
        Err(de::Error::custom(format!("YAML tag !{tag} is not supported (Kubernetes reads plain YAML)")))
    }
}

/// `<<: *base` (or a list of them): keys the mapping does not set itself come from the merged mappings,
/// the earlier ones first — YAML's merge key, which kubectl applies.
fn apply_merge<E: de::Error>(out: &mut Map<String, Value>, merged: Value) -> Result<(), E> {
    let sources = match merged {
        Value::Object(map) => vec![map],
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Object(map) => Ok(map),
                _ => Err(E::custom("`<<` (merge key) takes a mapping or a list of mappings")),
            })
            .collect::<Result<_, E>>()?,
        _ => return Err(E::custom("`<<` (merge key) takes a mapping or a list of mappings")),
    };
    for map in sources {
        for (key, value) in map {
            out.entry(key).or_insert(value);
        }
    }
    Ok(())
}

/// A mapping key as JSON has it: a string (scalars are written out as YAML has them).
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, number or boolean as a mapping key")
    }

    fn visit_bool<E>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i64<E>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_str<E>(self, v: &str) -> Result<String, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_unit<E>(self) -> Result<String, E> {
        Ok("null".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Value, String> {
        let mut budget = Budget::for_text(text.len());
        let document = serde_yaml::Deserializer::from_str(text).next().unwrap();
        budget.read(document).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_yaml_as_kubernetes_json() {
        let value = read("a: {8080: {mode: STRICT}, true: 1, 1.5: x}\nb: [1, -2, 2.5, null, ~, 'q']\n").unwrap();
        assert_eq!(value, serde_json::json!({"a": {"8080": {"mode": "STRICT"}, "true": 1, "1.5": "x"}, "b": [1, -2, 2.5, null, null, "q"]}));
        let merged = read("base: &b {x: 1, y: 2}\nuse: {<<: *b, y: 3}\n").unwrap();
        assert_eq!(merged["use"], serde_json::json!({"x": 1, "y": 3}), "own keys win over merged ones");
        assert!(read("a: 1\na: 2\n").unwrap_err().contains("duplicate key \"a\""));
        assert!(read("a: !custom x\n").unwrap_err().contains("!custom"));
        assert!(read("a: .inf\n").unwrap_err().contains("inf"));
    }

    #[test]
    fn limits_depth_and_alias_expansion() {
        let deep = format!("{}1\n", "- ".repeat(MAX_DEPTH + 1));
        assert!(read(&deep).unwrap_err().contains("deeper than 64"));
        assert!(read(&format!("{}1\n", "- ".repeat(MAX_DEPTH))).is_ok(), "control: at the limit");
        // Each level repeats the one below nine times: 9^8 nodes from a few hundred bytes.
        let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            laughs += &format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n");
        }
        assert!(read(&laughs).unwrap_err().contains("aliases repeat too much"));
    }
}
