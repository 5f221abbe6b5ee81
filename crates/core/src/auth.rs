//! What an API token may do. Scopes are ordered: each allows everything the ones below
//! it do.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read jobs, events, backends and metrics.
    Read,
    /// Also submit jobs and cancel the ones this token submitted.
    Submit,
    /// Also administer backends (drain, resume) and cancel anyone's jobs.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Submit, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    /// Whether a token of this scope may do what needs `need`.
    pub fn allows(self, need: Scope) -> bool {
        self >= need
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_scope_allows_what_those_below_it_do_and_no_more() {
        assert!(Scope::Admin.allows(Scope::Submit) && Scope::Admin.allows(Scope::Read));
        assert!(Scope::Submit.allows(Scope::Read) && !Scope::Submit.allows(Scope::Admin));
        assert!(!Scope::Read.allows(Scope::Submit));
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("root"), None);
    }
}
