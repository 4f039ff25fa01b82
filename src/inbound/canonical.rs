//! One pass over a request body that both validates it and computes its *signature*: a 128-bit
//! hash of its canonical form (object keys sorted, whitespace ignored) without `stream` and
//! `max_tokens`, which deduplication and the response cache use as their key.
//!
//! No JSON tree is built: each value is hashed as it is parsed, objects by their sorted
//! `(key, value hash)` pairs.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use xxhash_rust::xxh3::Xxh3;

/// The JSON kind of a hashed value (enough to validate `messages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

fn leaf(tag: u8, bytes: &[u8]) -> u128 {
    let mut h = Xxh3::new();
    h.update(&[tag]);
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
    h.digest128()
}

pub fn hash_str(s: &str) -> u128 {
    leaf(b's', s.as_bytes())
}

fn hash_u64(n: u64) -> u128 {
    leaf(b'n', n.to_string().as_bytes())
}

fn hash_i64(n: i64) -> u128 {
    if n >= 0 {
        hash_u64(n as u64)
    } else {
        leaf(b'n', n.to_string().as_bytes())
    }
}

fn hash_f64(f: f64) -> u128 {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        // 1.0 and 1 are the same number to every provider.
        return hash_i64(f as i64);
    }
    leaf(b'f', format!("{f:?}").as_bytes())
}

/// The hash of an object from its members, in any order.
pub fn hash_object(mut members: Vec<(Cow<'_, str>, u128)>) -> u128 {
    members.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Xxh3::new();
    h.update(b"{");
    for (k, v) in &members {
        h.update(&(k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update(&v.to_le_bytes());
    }
    h.update(b"}");
    h.digest128()
}

/// The same hash for an already parsed value.
pub fn hash_value(v: &Value) -> u128 {
    match v {
        Value::Null => leaf(b'z', b""),
        Value::Bool(b) => leaf(b'b', &[u8::from(*b)]),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => hash_u64(u),
            (_, Some(i), _) => hash_i64(i),
            (_, _, Some(f)) => hash_f64(f),
            _ => leaf(b'n', n.to_string().as_bytes()),
        },
        Value::String(s) => hash_str(s),
        Value::Array(items) => {
            let mut h = Xxh3::new();
            h.update(b"[");
            for i in items {
                h.update(&hash_value(i).to_le_bytes());
            }
            h.update(b"]");
            h.digest128()
        }
        Value::Object(map) => hash_object(
            map.iter()
                .map(|(k, v)| (Cow::Borrowed(k.as_str()), hash_value(v)))
                .collect(),
        ),
    }
}

/// Hashes any JSON value while it is parsed.
pub struct Canon;

impl<'de> DeserializeSeed<'de> for Canon {
    type Value = (u128, Kind);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(CanonVisitor)
    }
}

struct CanonVisitor;

impl<'de> Visitor<'de> for CanonVisitor {
    type Value = (u128, Kind);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok((leaf(b'b', &[u8::from(b)]), Kind::Bool))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok((hash_u64(n), Kind::Number))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok((hash_i64(n), Kind::Number))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Self::Value, E> {
        Ok((hash_f64(f), Kind::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok((hash_str(s), Kind::String))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok((leaf(b'z', b""), Kind::Null))
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok((leaf(b'z', b""), Kind::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut h = Xxh3::new();
        h.update(b"[");
        while let Some((v, _)) = seq.next_element_seed(Canon)? {
            h.update(&v.to_le_bytes());
        }
        h.update(b"]");
        Ok((h.digest128(), Kind::Array))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members: Vec<(Cow<'de, str>, u128)> = Vec::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let (v, _) = map.next_value_seed(Canon)?;
            members.push((key, v));
        }
        Ok((hash_object(members), Kind::Object))
    }
}

/// The top level of a request body: the envelope fields and the signature.
#[derive(Debug, Default)]
pub struct Head {
    /// The `model` value, when it is a string.
    pub model: Option<String>,
    /// Whether a `model` member is present at all.
    pub model_present: bool,
    pub messages_kind: Option<Kind>,
    pub stream: Option<bool>,
    pub provider: Option<String>,
    pub metadata: Option<Value>,
    /// Signature without `stream` and `max_tokens`.
    pub signature: u128,
    /// The hash of `max_tokens`, when present.
    pub max_tokens: Option<u128>,
}

impl<'de> de::Deserialize<'de> for Head {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(HeadVisitor)
    }
}

struct HeadVisitor;

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Head;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
        let mut head = Head::default();
        let mut members: Vec<(Cow<'de, str>, u128)> = Vec::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "stream" => {
                    let v: Option<bool> = map
                        .next_value()
                        .map_err(|_| de::Error::custom("stream: expected a boolean"))?;
                    head.stream = v;
                    continue;
                }
                "max_tokens" => {
                    head.max_tokens = Some(map.next_value_seed(Canon)?.0);
                    continue;
                }
                "model" => {
                    let v: Value = map.next_value()?;
                    head.model_present = true;
                    let h = hash_value(&v);
                    head.model = v.as_str().map(str::to_owned);
                    members.push((key, h));
                }
                "provider" => {
                    let v: Value = map.next_value()?;
                    let h = hash_value(&v);
                    head.provider = v.as_str().map(str::to_owned);
                    members.push((key, h));
                }
                "metadata" => {
                    let v: Value = map.next_value()?;
                    members.push((key, hash_value(&v)));
                    head.metadata = Some(v);
                }
                "messages" => {
                    let (h, kind) = map.next_value_seed(Canon)?;
                    head.messages_kind = Some(kind);
                    members.push((key, h));
                }
                _ => {
                    let (h, _) = map.next_value_seed(Canon)?;
                    members.push((key, h));
                }
            }
        }
        head.signature = hash_object(members);
        Ok(head)
    }
}
