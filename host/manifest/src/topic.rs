//! MQTT topic names and filters (MQTT 5 §4.7): validation and matching.
//!
//! Pure logic, no I/O: used for trigger subscriptions and for the publish ACL.

/// Largest topic length MQTT allows, in bytes.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Checks a topic *name* (what a message is published to): non-empty, no
/// wildcards, no NUL, at most 65,535 bytes.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a topic name cannot be empty".into());
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "topic is {} bytes long; MQTT allows at most {MAX_TOPIC_LEN}",
            name.len()
        ));
    }
    if name.contains(['+', '#']) {
        return Err(format!(
            "topic name {name:?} contains a wildcard (+ or #); only filters may"
        ));
    }
    if name.contains('\0') {
        return Err(format!("topic name {name:?} contains a NUL character"));
    }
    Ok(())
}

/// A validated topic filter, optionally a shared subscription
/// (`$share/GROUP/filter`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    /// The filter as written, including any `$share/GROUP/` prefix.
    pub raw: String,
    /// The shared-subscription group, if any.
    pub share_group: Option<String>,
    /// The filter part, without the `$share/GROUP/` prefix.
    pub filter: String,
}

impl TopicFilter {
    /// Parses and validates a filter: `+` must fill a whole level, `#` must be
    /// the whole last level, and a `$share/GROUP/` prefix needs a group name
    /// without wildcards and a non-empty filter.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (share_group, filter) = match raw.strip_prefix("$share/") {
            Some(rest) => {
                let Some((group, filter)) = rest.split_once('/') else {
                    return Err(format!(
                        "shared subscription {raw:?} needs the form $share/GROUP/FILTER"
                    ));
                };
                if group.is_empty() || group.contains(['+', '#']) {
                    return Err(format!(
                        "shared subscription {raw:?} has an invalid group name {group:?}"
                    ));
                }
                (Some(group.to_string()), filter)
            }
            None => (None, raw),
        };
        if filter.is_empty() {
            return Err(format!("topic filter {raw:?} is empty"));
        }
        if filter.len() > MAX_TOPIC_LEN {
            return Err(format!(
                "topic filter is {} bytes long; MQTT allows at most {MAX_TOPIC_LEN}",
                filter.len()
            ));
        }
        if filter.contains('\0') {
            return Err(format!("topic filter {raw:?} contains a NUL character"));
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
                return Err(format!(
                    "topic filter {raw:?}: '#' must be the whole last level"
                ));
            }
            if level.contains('+') && *level != "+" {
                return Err(format!("topic filter {raw:?}: '+' must fill a whole level"));
            }
        }
        Ok(Self {
            raw: raw.to_string(),
            share_group,
            filter: filter.to_string(),
        })
    }

    /// Whether a topic name matches this filter. Names starting with `$` are
    /// not matched by a leading wildcard (MQTT 5 §4.7.2).
    pub fn matches(&self, name: &str) -> bool {
        if name.starts_with('$') && (self.filter.starts_with('+') || self.filter.starts_with('#')) {
            return false;
        }
        let mut names = name.split('/');
        for level in self.filter.split('/') {
            match level {
                "#" => return true,
                "+" => {
                    if names.next().is_none() {
                        return false;
                    }
                }
                exact => {
                    if names.next() != Some(exact) {
                        return false;
                    }
                }
            }
        }
        names.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse() {
        for (raw, ok) in [
            ("a/b", true),
            ("a/+/c", true),
            ("#", true),
            ("a/#", true),
            ("+", true),
            ("$share/g/a/+", true),
            ("a/#/c", false),
            ("a/b#", false),
            ("a+/b", false),
            ("", false),
            ("$share/g", false),
            ("$share//a", false),
            ("$share/g/", false),
            ("$share/g+/a", false),
        ] {
            assert_eq!(TopicFilter::parse(raw).is_ok(), ok, "{raw:?}");
        }
    }

    #[test]
    fn filters_match() {
        for (filter, name, want) in [
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/+/c", "a/x/c", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "anything/at/all", true),
            ("#", "$SYS/broker", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/broker", true),
            ("a//b", "a//b", true),
            ("+/+", "/x", true),
            ("$share/g/a/+", "a/b", true),
        ] {
            let f = TopicFilter::parse(filter).unwrap();
            assert_eq!(f.matches(name), want, "{filter:?} vs {name:?}");
        }
    }

    #[test]
    fn names_validate() {
        assert!(validate_name("a/b").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/+").is_err());
        assert!(validate_name("a/#").is_err());
    }
}
