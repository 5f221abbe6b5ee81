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
    /// Only link a GPU machine (`gantry agent`); nothing of the API.
    Agent,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Submit, Scope::Admin, Scope::Agent];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Admin => "admin",
            Scope::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    /// Whether a token of this scope may do what needs `need`. Read < submit < admin;
    /// an agent token links an agent and does nothing else (an admin one may link too).
    pub fn allows(self, need: Scope) -> bool {
        let rank = |s: Scope| match s {
            Scope::Read => 0,
            Scope::Submit => 1,
            Scope::Admin => 2,
            Scope::Agent => 3,
        };
        match (self, need) {
            (Scope::Agent, need) => need == Scope::Agent,
            (Scope::Admin, Scope::Agent) => true,
            (_, Scope::Agent) => false,
            (have, need) => rank(have) >= rank(need),
        }
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
        assert!(Scope::Agent.allows(Scope::Agent) && !Scope::Agent.allows(Scope::Read));
        assert!(Scope::Admin.allows(Scope::Agent) && !Scope::Submit.allows(Scope::Agent));
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("root"), None);
    }
}
