//! `${VAR}` and `${VAR:-default}` expansion, applied to every string value of the file.

/// The result of expanding one string.
#[derive(Debug, PartialEq, Eq)]
pub struct Expanded {
    pub value: String,
    /// Variables that were referenced without a default and are not set.
    pub unset: Vec<String>,
}

/// Expands `${VAR}` and `${VAR:-default}` using `lookup`. An unset variable without a default
/// expands to the empty string and is reported in `unset`; `${VAR:-default}` uses the default when
/// the variable is unset or empty (as in the shell). Text that is not a complete `${...}` reference
/// is kept as written.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Expanded {
    let mut value = String::with_capacity(input.len());
    let mut unset = Vec::new();
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        value.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            value.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        if !is_var_name(name) {
            // Not a reference we understand: keep it literally.
            value.push_str(&rest[start..start + 2 + end + 1]);
        } else {
            match (lookup(name), default) {
                (Some(v), Some(d)) if v.is_empty() => value.push_str(d),
                (Some(v), _) => value.push_str(&v),
                (None, Some(d)) => value.push_str(d),
                (None, None) => unset.push(name.to_owned()),
            }
        }
        rest = &after[end + 1..];
    }
    value.push_str(rest);
    Expanded { value, unset }
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("sk-1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_references() {
        let cases = [
            ("${KEY}", "sk-1", vec![]),
            ("a-${KEY}-b", "a-sk-1-b", vec![]),
            ("${MISSING}", "", vec!["MISSING"]),
            ("${MISSING:-dflt}", "dflt", vec![]),
            ("${EMPTY:-dflt}", "dflt", vec![]),
            ("${KEY:-dflt}", "sk-1", vec![]),
            ("${KEY}${KEY}", "sk-1sk-1", vec![]),
            ("no refs", "no refs", vec![]),
            ("${unterminated", "${unterminated", vec![]),
            ("${not a var}", "${not a var}", vec![]),
            ("$KEY", "$KEY", vec![]),
            ("${MISSING:-}", "", vec![]),
        ];
        for (input, want, unset) in cases {
            let got = expand(input, &env);
            assert_eq!(got.value, want, "input {input:?}");
            assert_eq!(got.unset, unset, "input {input:?}");
        }
    }
}
