//! [`Secret`]: a string that must not show up in logs, errors or `Debug` output (an API key,
//! a password, a URL with a password in it).

use std::fmt;

use crate::validate::redact_url;

/// A secret string. Its `Debug` and `Display` never show the value: a key or password prints
/// as `***`, a URL made with [`Secret::url`] prints with its password replaced by `***`
/// (see [`redact_url`]). The value is only reachable through [`Secret::expose`], so every
/// place that hands it to a client is explicit.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    shown: Shown,
}

/// How a [`Secret`] is shown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shown {
    /// Not at all: `***`.
    Hidden,
    /// As a URL with its password redacted.
    RedactedUrl,
}

impl Secret {
    /// Wraps a key or password; shown as `***`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret {
            value: value.into(),
            shown: Shown::Hidden,
        }
    }

    /// Wraps a URL that may carry a password (or a list of them separated by commas); shown
    /// with each password replaced by `***`.
    pub fn url(value: impl Into<String>) -> Self {
        Secret {
            value: value.into(),
            shown: Shown::RedactedUrl,
        }
    }

    /// The secret itself, to hand to a client. Never log it.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.shown {
            Shown::Hidden => f.write_str("***"),
            Shown::RedactedUrl => f.write_str(&redact_url(&self.value)),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_shows_the_value() {
        let key = Secret::new("s3cr3t");
        assert_eq!(format!("{key}"), "***");
        assert_eq!(format!("{key:?}"), "Secret(***)");
        assert_eq!(key.expose(), "s3cr3t");
        let url = Secret::url("amqp://u:s3cr3t@h:5672/%2f");
        assert_eq!(format!("{url}"), "amqp://u:***@h:5672/%2f");
        assert!(!format!("{url:?}").contains("s3cr3t"));
    }
}
