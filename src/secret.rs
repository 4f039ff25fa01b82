//! A string that must never be printed: API keys, tokens, proxy passwords.

use std::fmt;

/// A secret value. `Debug` and `Display` print a mask, never the value; the value is reachable
/// only through [`Secret::expose`], which is called where it goes on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for a request header or a comparison. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A masked form for admin output: the last four characters of a long key, nothing of a short one.
    pub fn masked(&self) -> String {
        let n = self.0.chars().count();
        if n >= 16 {
            let tail: String = self.0.chars().skip(n - 4).collect();
            format!("****{tail}")
        } else {
            "****".to_owned()
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// Removes the password (and user name) from a URL such as `socks5://user:pass@host:1080`.
pub fn mask_url_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://****@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("sk-ant-very-secret-value-1234");
        assert!(!format!("{s:?}").contains("secret"));
        assert!(!format!("{s}").contains("secret"));
        assert_eq!(s.masked(), "****1234");
        assert_eq!(Secret::new("short").masked(), "****");
    }

    #[test]
    fn url_credentials_are_masked() {
        assert_eq!(
            mask_url_credentials("socks5://me:pw@127.0.0.1:1080"),
            "socks5://****@127.0.0.1:1080"
        );
        assert_eq!(
            mask_url_credentials("http://proxy.local:8080/x"),
            "http://proxy.local:8080/x"
        );
    }
}
