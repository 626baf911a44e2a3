//! Tenant identity. Every read and write of the vector store is scoped by a [`TenantId`];
//! the type can only be built from a validated, non-empty name, so "no tenant" cannot be
//! expressed at all (fail closed).

use std::fmt;

/// A validated tenant name: 1 to 64 characters from `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

/// Why a tenant name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    /// The name is empty (or only whitespace).
    #[error("tenant id is empty")]
    Empty,
    /// The name is longer than 64 characters.
    #[error("tenant id is {0} characters long; the limit is 64")]
    TooLong(usize),
    /// The name holds a character outside `[A-Za-z0-9_.-]`.
    #[error("tenant id {0:?} may only contain letters, digits, '_', '.' and '-'")]
    BadCharacter(String),
}

impl TenantId {
    /// Validates `name`; fails if it is empty, longer than 64 characters or holds other
    /// characters than ASCII letters, digits, `_`, `.` and `-`.
    pub fn new(name: impl Into<String>) -> Result<Self, TenantError> {
        let name = name.into();
        if name.trim().is_empty() {
            return Err(TenantError::Empty);
        }
        let len = name.chars().count();
        if len > 64 {
            return Err(TenantError::TooLong(len));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(TenantError::BadCharacter(name));
        }
        Ok(TenantId(name))
    }

    /// The tenant name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_names() {
        assert!(TenantId::new("acme").is_ok());
        assert!(TenantId::new("a.b-c_1").is_ok());
        assert_eq!(TenantId::new(""), Err(TenantError::Empty));
        assert_eq!(TenantId::new("  "), Err(TenantError::Empty));
        assert!(matches!(
            TenantId::new("a b"),
            Err(TenantError::BadCharacter(_))
        ));
        assert!(matches!(
            TenantId::new("x".repeat(65)),
            Err(TenantError::TooLong(65))
        ));
    }
}
