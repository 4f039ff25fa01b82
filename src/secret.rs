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

/// Masks secrets in text on its way out of the process (answers, fault reasons, logs, admin
/// views): each secret as configured and in the forms a JSON writer gives it (quotes and
/// backslashes escaped, `/` written `\/`). It is applied before any text is cut short, so a key
/// straddling the cut cannot leave a prefix behind. Secrets shorter than [`Redactor::MIN_LEN`]
/// are not looked for (they would mask ordinary words).
#[derive(Clone, Default)]
pub struct Redactor {
    /// The byte forms to find, longest first.
    needles: Vec<Vec<u8>>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} forms)", self.needles.len())
    }
}

/// What a secret is replaced with.
const MASK: &[u8] = b"****";

impl Redactor {
    pub const MIN_LEN: usize = 6;

    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut r = Self::default();
        r.add_all(secrets);
        r
    }

    /// This redactor with more secrets (a request's own credentials).
    pub fn with<'a>(&self, more: impl IntoIterator<Item = &'a str>) -> Self {
        let mut r = self.clone();
        r.add_all(more);
        r
    }

    fn add_all<'a>(&mut self, secrets: impl IntoIterator<Item = &'a str>) {
        for s in secrets {
            if s.len() < Self::MIN_LEN {
                continue;
            }
            let escaped = serde_json::to_string(s).unwrap_or_default();
            let escaped = escaped
                .strip_prefix('"')
                .and_then(|e| e.strip_suffix('"'))
                .unwrap_or(s)
                .to_owned();
            let slashed = escaped.replace('/', "\\/");
            for form in [s.to_owned(), escaped, slashed] {
                let form = form.into_bytes();
                if !self.needles.contains(&form) {
                    self.needles.push(form);
                }
            }
        }
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    }

    /// `text` with every secret masked.
    pub fn text<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        match self.masked(text.as_bytes()) {
            None => std::borrow::Cow::Borrowed(text),
            Some(out) => std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned()),
        }
    }

    /// `bytes` with every secret masked (the same buffer when none is there).
    pub fn bytes(&self, bytes: bytes::Bytes) -> bytes::Bytes {
        match self.masked(&bytes) {
            None => bytes,
            Some(out) => bytes::Bytes::from(out),
        }
    }

    fn masked(&self, input: &[u8]) -> Option<Vec<u8>> {
        let mut current: Option<Vec<u8>> = None;
        for needle in &self.needles {
            let hay = current.as_deref().unwrap_or(input);
            let finder = memchr::memmem::Finder::new(needle);
            let mut at = 0;
            let mut out: Option<Vec<u8>> = None;
            while let Some(found) = finder.find(&hay[at..]) {
                let o = out.get_or_insert_with(|| Vec::with_capacity(hay.len()));
                o.extend_from_slice(&hay[at..at + found]);
                o.extend_from_slice(MASK);
                at += found + needle.len();
            }
            if let Some(mut o) = out {
                o.extend_from_slice(&hay[at..]);
                current = Some(o);
            }
        }
        current
    }
}

/// The password of a URL written as `scheme://user:password@host`, or given as a `pass=` or
/// `password=` query parameter (`redis+unix:///run/redis.sock?pass=…`), if any.
pub fn url_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let from_userinfo = authority.rfind('@').and_then(|at| {
        authority[..at]
            .split_once(':')
            .map(|(_, p)| p)
            .filter(|p| !p.is_empty())
    });
    from_userinfo.or_else(|| {
        let query = url.split_once('?')?.1;
        query
            .split('&')
            .find_map(|kv| {
                kv.strip_prefix("pass=")
                    .or_else(|| kv.strip_prefix("password="))
            })
            .filter(|p| !p.is_empty())
    })
}

/// Removes the password (and user name) from a URL such as `socks5://user:pass@host:1080`, and
/// the value of a `pass=` or `password=` query parameter.
pub fn mask_url_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let masked = match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://****@{}", &rest[at + 1..]),
        None => url.to_owned(),
    };
    match masked.split_once('?') {
        Some((base, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k == "pass" || k == "password" => format!("{k}=****"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        None => masked,
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
    fn secrets_are_masked_raw_and_json_escaped() {
        let r = Redactor::new(["sk-ab/cd+ef==", "short", "key-with-\"quote"]);
        let text = r#"raw sk-ab/cd+ef== escaped sk-ab\/cd+ef== quoted key-with-\"quote short"#;
        let out = r.text(text);
        assert_eq!(out, "raw **** escaped **** quoted **** short");
        assert!(matches!(
            r.text("nothing here"),
            std::borrow::Cow::Borrowed(_)
        ));
        let b = bytes::Bytes::from_static(b"x sk-ab/cd+ef== y");
        assert_eq!(&r.bytes(b)[..], b"x **** y");
        let more = r.with(["client-key-1"]);
        assert_eq!(more.text("client-key-1 sk-ab/cd+ef=="), "**** ****");
        assert!(!format!("{more:?}").contains("client"));
    }

    #[test]
    fn url_passwords_are_found() {
        assert_eq!(url_password("socks5://me:pw-1234@h:1080"), Some("pw-1234"));
        assert_eq!(url_password("http://h:8080/x@y"), None);
        assert_eq!(url_password("http://user@h"), None);
        assert_eq!(
            url_password("redis+unix:///run/redis.sock?db=1&pass=pw-99"),
            Some("pw-99")
        );
        assert_eq!(
            url_password("unix:///run/r.sock?password=pw-98"),
            Some("pw-98")
        );
        assert_eq!(url_password("redis://h/0?protocol=resp3"), None);
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
        assert_eq!(
            mask_url_credentials("redis+unix:///run/redis.sock?db=1&pass=pw-99"),
            "redis+unix:///run/redis.sock?db=1&pass=****"
        );
    }
}
