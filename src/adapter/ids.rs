//! Ids and signatures that must survive a session moving between routes (the protocol reference's ids
//! and thinking ⇄ reasoning sections).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Prefix of a tool id that encodes an upstream id Anthropic would reject.
const ENCODED_PREFIX: &str = "toolu_gw_";
/// Prefix of every thinking signature this gateway mints.
pub const SIGNATURE_PREFIX: &str = "gw1.";

pub fn base62(n: usize) -> String {
    (0..n)
        .map(|_| char::from(BASE62[fastrand::usize(..BASE62.len())]))
        .collect()
}

/// `msg_` plus 24 random base62 characters: unique per response.
pub fn message_id() -> String {
    format!("msg_{}", base62(24))
}

/// `toolu_` plus 24 random base62 characters.
pub fn tool_id() -> String {
    format!("toolu_{}", base62(24))
}

/// Whether Anthropic accepts this tool id (`^[a-zA-Z0-9_-]+$`).
pub fn valid_anthropic_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An upstream tool-call id as an Anthropic tool_use id: kept when valid, encoded reversibly
/// otherwise, minted when missing.
pub fn tool_id_from_upstream(upstream: Option<&str>) -> String {
    match upstream {
        Some(id) if valid_anthropic_id(id) => id.to_owned(),
        Some(id) if !id.is_empty() => format!("{ENCODED_PREFIX}{}", URL_SAFE_NO_PAD.encode(id)),
        _ => tool_id(),
    }
}

/// The upstream form of an Anthropic tool id: decodes [`tool_id_from_upstream`]'s encoding.
pub fn tool_id_to_upstream(id: &str) -> String {
    if let Some(encoded) = id.strip_prefix(ENCODED_PREFIX) {
        if let Some(decoded) = URL_SAFE_NO_PAD
            .decode(encoded)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
        {
            return decoded;
        }
    }
    id.to_owned()
}

/// A recognisable signature for a thinking block this gateway synthesised.
pub fn thinking_signature(thinking: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"claude-balancer thinking v1\0")
        .chain_update(thinking.as_bytes())
        .finalize();
    let mut sig = URL_SAFE_NO_PAD.encode(digest);
    sig.truncate(43);
    format!("{SIGNATURE_PREFIX}{sig}")
}

pub fn is_gateway_signature(signature: &str) -> bool {
    signature.starts_with(SIGNATURE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_well_formed() {
        let a = message_id();
        let b = message_id();
        assert_ne!(a, b);
        assert!(a.starts_with("msg_") && a.len() == 28 && valid_anthropic_id(&a));
        assert!(valid_anthropic_id(&tool_id()));
    }

    #[test]
    fn tool_ids_round_trip() {
        assert_eq!(tool_id_from_upstream(Some("call_abc-1")), "call_abc-1");
        let kimi = "functions.Bash:0";
        let enc = tool_id_from_upstream(Some(kimi));
        assert!(
            enc.starts_with("toolu_gw_") && valid_anthropic_id(&enc),
            "{enc}"
        );
        assert_eq!(tool_id_to_upstream(&enc), kimi);
        assert_eq!(tool_id_to_upstream("toolu_01AbC"), "toolu_01AbC");
        let minted = tool_id_from_upstream(Some(""));
        assert!(minted.starts_with("toolu_") && valid_anthropic_id(&minted));
        assert!(tool_id_from_upstream(None).starts_with("toolu_"));
    }

    #[test]
    fn signatures_are_recognisable_and_stable() {
        let s = thinking_signature("hmm");
        assert_eq!(s, thinking_signature("hmm"));
        assert_ne!(s, thinking_signature("hmm."));
        assert!(is_gateway_signature(&s));
        assert_eq!(s.len(), 4 + 43);
        assert!(!is_gateway_signature("EqQBCkgIBhABGAIiQ"));
    }
}
