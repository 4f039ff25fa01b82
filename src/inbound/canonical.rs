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
use xxhash_rust::xxh3::{xxh3_64, xxh3_128_with_seed};

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
    xxh3_128_with_seed(bytes, u64::from(tag))
}

pub fn hash_str(s: &str) -> u128 {
    leaf(b's', s.as_bytes())
}

fn hash_u64(n: u64) -> u128 {
    leaf(b'n', &n.to_le_bytes())
}

fn hash_i64(n: i64) -> u128 {
    if n >= 0 {
        hash_u64(n as u64)
    } else {
        leaf(b'i', &n.to_le_bytes())
    }
}

fn hash_f64(f: f64) -> u128 {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        // 1.0 and 1 are the same number to every provider.
        return hash_i64(f as i64);
    }
    leaf(b'f', &f.to_bits().to_le_bytes())
}

/// The hash of a list from its elements' hashes, in order.
fn hash_list(items: &[u8]) -> u128 {
    xxh3_128_with_seed(items, u64::from(b'['))
}

/// The hash of an object from its members, in any order.
pub fn hash_object(mut members: Vec<(Cow<'_, str>, u128)>) -> u128 {
    members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut buf = Vec::with_capacity(members.len() * 24);
    for (k, v) in &members {
        buf.extend_from_slice(&xxh3_64(k.as_bytes()).to_le_bytes());
        buf.extend_from_slice(&v.to_le_bytes());
    }
    xxh3_128_with_seed(&buf, u64::from(b'{'))
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
            let buf: Vec<u8> = items
                .iter()
                .flat_map(|i| hash_value(i).to_le_bytes())
                .collect();
            hash_list(&buf)
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
        let mut buf = Vec::with_capacity(seq.size_hint().unwrap_or(8) * 16);
        while let Some((v, _)) = seq.next_element_seed(Canon)? {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        Ok((hash_list(&buf), Kind::Array))
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
        d.deserialize_map(HeadVisitor { sign: true })
    }
}

/// Reads the top level; `sign: false` skips the signature (nothing needs it) and only validates.
pub struct HeadSeed {
    pub sign: bool,
}

impl<'de> DeserializeSeed<'de> for HeadSeed {
    type Value = Head;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Head, D::Error> {
        d.deserialize_map(HeadVisitor { sign: self.sign })
    }
}

/// Skips a value, reporting only its kind.
struct KindOnly;

impl<'de> DeserializeSeed<'de> for KindOnly {
    type Value = Kind;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
        d.deserialize_any(KindVisitor)
    }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Kind, E> {
        Ok(Kind::Bool)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Kind, E> {
        Ok(Kind::Number)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Kind, E> {
        Ok(Kind::Number)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Kind, E> {
        Ok(Kind::Number)
    }
    fn visit_str<E>(self, _: &str) -> Result<Kind, E> {
        Ok(Kind::String)
    }
    fn visit_unit<E>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_none<E>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Kind::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Kind::Object)
    }
}

struct HeadVisitor {
    sign: bool,
}

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
                "max_tokens" if !self.sign => {
                    map.next_value::<de::IgnoredAny>()?;
                }
                "max_tokens" => {
                    head.max_tokens = Some(map.next_value_seed(Canon)?.0);
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
                "messages" if !self.sign => {
                    head.messages_kind = Some(map.next_value_seed(KindOnly)?)
                }
                "messages" => {
                    let (h, kind) = map.next_value_seed(Canon)?;
                    head.messages_kind = Some(kind);
                    members.push((key, h));
                }
                _ if !self.sign => {
                    map.next_value::<de::IgnoredAny>()?;
                }
                _ => {
                    let (h, _) = map.next_value_seed(Canon)?;
                    members.push((key, h));
                }
            }
        }
        if self.sign {
            head.signature = hash_object(members);
        }
        Ok(head)
    }
}
