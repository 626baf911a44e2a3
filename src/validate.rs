//! Checks and redaction shared by the configuration, the queue and the stores: names,
//! environment-variable names, URLs, and hiding the password of a URL.
//!
//! This module depends on nothing else in the crate (std only), so any module may use it
//! without creating an import cycle. Every function here is pure and cannot fail: checks
//! answer `true`/`false` and callers phrase the error for their own field.

/// Whether `name` can be the name of an environment variable: letters, digits and `_`, not
/// empty and not starting with a digit.
pub fn is_env_var_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `name` is a plain name: 1 to `max_len` characters, each an ASCII letter, digit,
/// `_` or `-` (pipeline and collection names).
pub fn is_plain_name(name: &str, max_len: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_len
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// Whether `url` starts with `scheme` (e.g. `amqps://`), ignoring ASCII case.
pub fn has_scheme(url: &str, scheme: &str) -> bool {
    url.get(..scheme.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
}

/// What follows `http://` or `https://` in `url` (case-sensitive, as the HTTP clients want
/// it); `None` for any other scheme.
pub fn after_http_scheme(url: &str) -> Option<&str> {
    url.strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
}

/// Whether the authority of an `http(s)://` URL carries user information (`user:pass@`).
/// `false` for URLs of other schemes.
pub fn http_url_has_credentials(url: &str) -> bool {
    after_http_scheme(url).is_some_and(|rest| {
        rest.split('/')
            .next()
            .is_some_and(|authority| authority.contains('@'))
    })
}

/// Whether `url` is an `http://` or `https://` URL with a host (something between the scheme
/// and the first `/`).
pub fn is_http_url_with_host(url: &str) -> bool {
    after_http_scheme(url).is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
}

/// Splits a list of URLs separated by commas (`amqp://a/,amqp://b/`) into its URLs, trimmed,
/// without empty entries. A comma only separates when the text after it (past spaces) starts a
/// new URL (`scheme://`), so a comma inside a password does not split a single URL.
pub fn split_url_list(list: &str) -> Vec<&str> {
    let mut urls = Vec::new();
    let mut start = 0;
    for (i, c) in list.char_indices() {
        if c == ',' && starts_url(&list[i + 1..]) {
            urls.push(list[start..i].trim());
            start = i + 1;
        }
    }
    urls.push(list[start..].trim());
    urls.retain(|u| !u.is_empty());
    urls
}

/// Whether `text` (after leading spaces) starts with `scheme://`.
fn starts_url(text: &str) -> bool {
    let text = text.trim_start();
    let Some(end) = text.find("://") else {
        return false;
    };
    let scheme = &text[..end];
    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Replaces the password of a URL like `amqp://user:pass@host/` with `***`; in a list of URLs
/// separated by commas ([`split_url_list`]), that of each one.
///
/// The password is everything between the first `:` of the user information and the LAST `@`
/// of the URL, so a password with an unencoded `/`, `@`, `#`, `?` or `:` is hidden whole. (A
/// URL without a password but with `@` after a `:` further on, e.g. in a query, is redacted
/// from that `:` on: more than needed, never less.)
pub fn redact_url(url: &str) -> String {
    let urls = split_url_list(url);
    if urls.len() > 1 {
        return urls
            .iter()
            .map(|u| redact_one_url(u))
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one_url(url)
}

fn redact_one_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}://{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_env_var_names() {
        assert!(is_env_var_name("MY_KEY_2"));
        for bad in ["", "2KEY", "MY-KEY", "a key"] {
            assert!(!is_env_var_name(bad), "{bad:?}");
        }
        assert!(is_plain_name("docs-1_x", 100));
        assert!(!is_plain_name("", 100));
        assert!(!is_plain_name("a.b", 100));
        assert!(!is_plain_name("abc", 2));
    }

    #[test]
    fn http_urls() {
        assert!(is_http_url_with_host("http://qdrant:6334"));
        assert!(!is_http_url_with_host("http://"));
        assert!(!is_http_url_with_host("http:///x"));
        assert!(!is_http_url_with_host("qdrant:6334"));
        assert!(http_url_has_credentials("http://u:p@h:1/x"));
        assert!(!http_url_has_credentials("http://h:1/a@b"));
        assert!(has_scheme("AMQPS://h", "amqps://"));
        assert!(!has_scheme("amqp://h", "amqps://"));
    }
}
