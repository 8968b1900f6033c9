//! Channel names and who may subscribe to them (SPEC §4.4).
//!
//! A channel is a named stream inside a tenant, `<namespace>:<id>`. Who may
//! subscribe: an admin, to any channel of its tenant; a user, to what its
//! token's `channels` claim allows, or without that claim to what the
//! setting `USER_CHANNELS` allows. Both are lists of [`Pattern`]s: an exact
//! name, or a prefix ending in `*`.

use std::fmt;

/// The longest namespace (before the `:`) and id (after it).
const NAMESPACE_MAX: usize = 32;
const ID_MAX: usize = 128;

/// The most patterns a `channels` claim or `USER_CHANNELS` may hold.
pub const MAX_PATTERNS: usize = 64;

/// Whether `name` is a channel name:
/// `^[a-z][a-z0-9_-]{0,31}:[A-Za-z0-9_.:@=-]{1,128}$`.
pub fn valid_name(name: &str) -> bool {
    let Some((namespace, id)) = name.split_once(':') else {
        return false;
    };
    valid_namespace(namespace)
        && (1..=ID_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@=-".contains(&b))
}

fn valid_namespace(namespace: &str) -> bool {
    let mut bytes = namespace.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && namespace.len() <= NAMESPACE_MAX
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
}

/// The namespace of a valid channel name (`task` of `task:7f3a`).
pub fn namespace(name: &str) -> &str {
    name.split_once(':')
        .map_or(name, |(namespace, _)| namespace)
}

/// An exact channel name, or a prefix of names ending in `*` (`*` alone: every channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl Pattern {
    /// Parses one pattern; `None` when it is neither a channel name nor a
    /// prefix of one followed by `*`.
    pub fn parse(text: &str) -> Option<Pattern> {
        match text.strip_suffix('*') {
            Some(prefix) => valid_prefix(prefix).then(|| Pattern::Prefix(prefix.into())),
            None => valid_name(text).then(|| Pattern::Exact(text.into())),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => &**exact == name,
            Pattern::Prefix(prefix) => name.starts_with(&**prefix),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(name) => f.write_str(name),
            Pattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// A prefix some channel name can start with: a namespace being typed, or a
/// namespace, `:` and the start of an id.
fn valid_prefix(prefix: &str) -> bool {
    match prefix.split_once(':') {
        None => prefix.is_empty() || valid_namespace(prefix),
        Some((namespace, id)) => {
            valid_namespace(namespace)
                && id.len() < ID_MAX
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:@=-".contains(&b))
        }
    }
}

/// A list of patterns (`USER_CHANNELS`, or a token's `channels` claim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patterns(Box<[Pattern]>);

impl Patterns {
    /// Every channel of the tenant (`*`), the default of `USER_CHANNELS`.
    pub fn all() -> Self {
        Patterns(Box::new([Pattern::Prefix("".into())]))
    }

    /// Parses a list; the error names the first pattern that is not one.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for item in items {
            let Some(pattern) = Pattern::parse(item) else {
                let shown: String = item.chars().take(64).collect();
                return Err(format!(
                    "'{shown}' is neither a channel name nor a prefix ending in '*'"
                ));
            };
            patterns.push(pattern);
        }
        if patterns.len() > MAX_PATTERNS {
            return Err(format!("at most {MAX_PATTERNS} channel patterns"));
        }
        Ok(Patterns(patterns.into_boxed_slice()))
    }

    /// Parses a comma-separated list (`USER_CHANNELS`); empty allows nothing.
    pub fn parse_list(text: &str) -> Result<Self, String> {
        Patterns::parse(text.split(',').map(str::trim).filter(|s| !s.is_empty()))
    }

    pub fn allows(&self, name: &str) -> bool {
        self.0.iter().any(|pattern| pattern.matches(name))
    }
}

impl fmt::Display for Patterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.0.iter().map(Pattern::to_string).collect();
        f.write_str(&shown.join(","))
    }
}

/// Whether a token may subscribe to (and read the history of) `name` in its
/// tenant: an admin's always; a user's by its `claim` (the token's
/// `channels`), or without one by `defaults` (`USER_CHANNELS`).
pub fn may_subscribe(
    admin: bool,
    claim: Option<&[String]>,
    defaults: &Patterns,
    name: &str,
) -> bool {
    if admin {
        return true;
    }
    match claim {
        Some(patterns) => patterns
            .iter()
            .filter_map(|p| Pattern::parse(p))
            .any(|p| p.matches(name)),
        None => defaults.allows(name),
    }
}

/// Checks a token's `channels` claim: at most [`MAX_PATTERNS`] valid patterns.
pub fn check_claim(patterns: &[String]) -> Result<(), &'static str> {
    if patterns.len() > MAX_PATTERNS {
        return Err("channels holds more than 64 patterns");
    }
    if patterns.iter().any(|p| Pattern::parse(p).is_none()) {
        return Err(
            "channels holds something that is neither a channel name nor a prefix ending in '*'",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in [
            "task:7f3a",
            "run:42",
            "agent:a1",
            "a:b",
            "x_y-z9:A.b:c@d=e-f_",
            &format!("{}:{}", "n".repeat(32), "i".repeat(128)),
        ] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "task",
            "task:",
            ":id",
            "Task:1",
            "9ask:1",
            "task:*",
            "task:a b",
            "task:a/b",
            "task:é",
            &format!("{}:1", "n".repeat(33)),
            &format!("t:{}", "i".repeat(129)),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn patterns_match_exact_names_and_prefixes() {
        let patterns = Patterns::parse(["task:*", "run:42"]).unwrap();
        assert!(patterns.allows("task:7f3a"));
        assert!(patterns.allows("run:42"));
        assert!(!patterns.allows("run:421"));
        assert!(!patterns.allows("agent:a1"));
        assert!(Patterns::all().allows("anything:x"));
        assert!(!Patterns::parse_list("").unwrap().allows("task:1"));
        assert_eq!(Patterns::parse_list(" task:* , run:42 ").unwrap(), patterns);
        assert!(Patterns::parse(["task"]).is_err(), "a name needs its id");
        assert!(Patterns::parse(["ta*"]).is_ok());
        assert!(Patterns::parse(["Task:*"]).is_err());
        assert!(Patterns::parse(["task:a b*"]).is_err());
    }

    #[test]
    fn admins_may_subscribe_to_anything_users_by_claim_then_setting() {
        let defaults = Patterns::parse_list("task:*").unwrap();
        assert!(may_subscribe(true, Some(&[]), &defaults, "run:1"));
        assert!(may_subscribe(false, None, &defaults, "task:1"));
        assert!(!may_subscribe(false, None, &defaults, "run:1"));
        let claim = ["run:1".to_owned()];
        assert!(may_subscribe(false, Some(&claim), &defaults, "run:1"));
        assert!(
            !may_subscribe(false, Some(&claim), &defaults, "task:1"),
            "the claim wins"
        );
        assert!(
            !may_subscribe(false, Some(&[]), &defaults, "task:1"),
            "[] allows nothing"
        );
    }

    #[test]
    fn claims_are_bounded_and_checked() {
        assert!(check_claim(&["task:*".to_owned()]).is_ok());
        assert!(check_claim(&vec!["task:*".to_owned(); 65]).is_err());
        assert!(check_claim(&["no".to_owned()]).is_err());
    }
}
