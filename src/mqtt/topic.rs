//! MQTT topic names and filters: validation, matching, shared subscriptions, and the trie that
//! finds every subscription matching a topic.
//!
//! Rules (MQTT 3.1.1 section 4.7 and 5.0 section 4.7):
//! - A topic name is 1..=65535 bytes of UTF-8 without `+`, `#` or NUL.
//! - A filter's `+` must fill a whole level; `#` must be the whole last level.
//! - A filter starting with a wildcard (`+` or `#`) does not match a topic starting with `$`.
//! - `$share/{group}/{filter}` is a shared subscription: one member of the group gets each message.

use std::collections::HashMap;

/// Longest topic or filter, in bytes (the MQTT string limit).
pub const TOPIC_BYTES_MAX: usize = 65_535;

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty.
    #[error("topic must not be empty")]
    Empty,
    /// Over the MQTT string limit.
    #[error("topic is longer than {TOPIC_BYTES_MAX} bytes")]
    TooLong,
    /// Contains NUL.
    #[error("topic must not contain NUL")]
    Nul,
    /// A topic name (not a filter) with `+` or `#`.
    #[error("a topic name must not contain wildcards")]
    WildcardInName,
    /// `+` or `#` not filling a whole level, or `#` not last.
    #[error("wildcards must fill a whole level and # must be last")]
    BadWildcard,
    /// `$share/` without a valid group and filter.
    #[error("shared subscription must be $share/{{group}}/{{filter}}")]
    BadShare,
}

fn check_common(text: &str) -> Result<(), TopicError> {
    if text.is_empty() {
        return Err(TopicError::Empty);
    }
    if text.len() > TOPIC_BYTES_MAX {
        return Err(TopicError::TooLong);
    }
    if text.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Checks a topic name (what a PUBLISH carries).
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a plain (non-shared) topic filter.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        let has_plus = level.contains('+');
        let has_hash = level.contains('#');
        if (has_plus && *level != "+") || (has_hash && (*level != "#" || i != last)) {
            return Err(TopicError::BadWildcard);
        }
    }
    Ok(())
}

/// A subscription filter, possibly shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ParsedFilter {
    /// The share group for `$share/{group}/...`.
    pub share_group: Option<String>,
    /// The filter matched against topics.
    pub filter: String,
}

/// Parses and validates a SUBSCRIBE filter, recognising `$share/{group}/{filter}`.
pub fn parse_filter(text: &str) -> Result<ParsedFilter, TopicError> {
    if let Some(rest) = text.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
            return Err(TopicError::BadShare);
        }
        validate_filter(filter)?;
        return Ok(ParsedFilter {
            share_group: Some(group.to_owned()),
            filter: filter.to_owned(),
        });
    }
    validate_filter(text)?;
    Ok(ParsedFilter {
        share_group: None,
        filter: text.to_owned(),
    })
}

/// Whether `filter` matches `topic` (both already validated).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether filter `outer` matches every topic filter `inner` can match (so a rule on `outer`
/// may grant a subscription to `inner`). Wildcards in `inner` are not plain levels: `a/+`
/// does not cover `a/#`, and a filter starting with a wildcard covers no `$` filter.
pub fn covers(outer: &str, inner: &str) -> bool {
    if outer.starts_with(['+', '#']) && inner.starts_with('$') {
        return false;
    }
    let mut outer_levels = outer.split('/');
    let mut inner_levels = inner.split('/');
    loop {
        match (outer_levels.next(), inner_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(o), Some(i)) if o == i && o != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic matches both filters `a` and `b`.
pub fn intersects(a: &str, b: &str) -> bool {
    let dollar = |f: &str| f.starts_with('$');
    let wild = |f: &str| f.starts_with(['+', '#']);
    if (wild(a) && dollar(b)) || (wild(b) && dollar(a)) {
        return false;
    }
    let mut a_levels = a.split('/');
    let mut b_levels = b.split('/');
    loop {
        match (a_levels.next(), b_levels.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

/// Maps filters to subscribers and finds every subscriber of a topic in time proportional to the
/// topic's depth (not to the number of subscriptions).
#[derive(Debug)]
pub struct FilterTrie<V> {
    /// Filters without wildcards (a device's own reply topics, mostly), by the one topic each
    /// matches: routing a topic is one lookup of the whole name, not a walk level by level.
    exact: HashMap<String, Vec<V>>,
    /// Filters with a wildcard; walked only while there is any.
    root: Node<V>,
    wildcard_filters: usize,
    len: usize,
    /// Filters by their literal last level, and those ending in a wildcard (which can match
    /// any last level): whether a topic can match anything is then known from its last level
    /// alone most of the time, without walking.
    ends: HashMap<String, usize>,
    wildcard_ends: usize,
}

#[derive(Debug)]
struct Node<V> {
    /// Literal next levels.
    children: HashMap<String, Node<V>>,
    /// The `+` next level (apart: a lookup per level is saved for topics, which never hold `+`).
    plus: Option<Box<Node<V>>>,
    /// Subscribers whose filter ends here.
    here: Vec<V>,
    /// Subscribers of `.../#` at this node.
    multi: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            here: Vec::new(),
            multi: Vec::new(),
        }
    }
}

impl<V> Default for FilterTrie<V> {
    fn default() -> Self {
        FilterTrie {
            exact: HashMap::new(),
            root: Node::default(),
            wildcard_filters: 0,
            len: 0,
            ends: HashMap::new(),
            wildcard_ends: 0,
        }
    }
}

impl<V: PartialEq + Clone> FilterTrie<V> {
    /// Adds `value` under `filter` (a validated, non-shared filter). Returns false if present.
    pub fn insert(&mut self, filter: &str, value: V) -> bool {
        let inserted = self.insert_value(filter, value);
        if inserted {
            self.len += 1;
            match last_level(filter) {
                "+" | "#" => self.wildcard_ends += 1,
                last => *self.ends.entry(last.to_owned()).or_default() += 1,
            }
        }
        inserted
    }

    fn insert_value(&mut self, filter: &str, value: V) -> bool {
        if !has_wildcard(filter) {
            let values = self.exact.entry(filter.to_owned()).or_default();
            if values.contains(&value) {
                return false;
            }
            values.push(value);
            return true;
        }
        self.wildcard_filters += 1;
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                if node.multi.contains(&value) {
                    self.wildcard_filters -= 1;
                    return false;
                }
                node.multi.push(value);
                return true;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.to_owned()).or_default()
            };
        }
        if node.here.contains(&value) {
            self.wildcard_filters -= 1;
            return false;
        }
        node.here.push(value);
        true
    }

    /// Removes `value` from `filter`; returns whether it was there. Empty nodes are pruned.
    pub fn remove(&mut self, filter: &str, value: &V) -> bool {
        let removed = if has_wildcard(filter) {
            let levels: Vec<&str> = filter.split('/').collect();
            let removed = remove_at(&mut self.root, &levels, value);
            if removed {
                self.wildcard_filters -= 1;
            }
            removed
        } else {
            match self.exact.get_mut(filter) {
                Some(values) => {
                    let removed = remove_value(values, value);
                    if values.is_empty() {
                        self.exact.remove(filter);
                    }
                    removed
                }
                None => false,
            }
        };
        if removed {
            self.len -= 1;
            match last_level(filter) {
                "+" | "#" => self.wildcard_ends -= 1,
                last => {
                    if let Some(n) = self.ends.get_mut(last) {
                        *n -= 1;
                        if *n == 0 {
                            self.ends.remove(last);
                        }
                    }
                }
            }
        }
        removed
    }

    /// Whether some filter could match a topic whose last level is `level` (a filter with that
    /// literal last level, or one ending in a wildcard): false means no topic ending so does.
    pub fn may_match_ending(&self, level: &str) -> bool {
        self.wildcard_ends > 0 || self.ends.contains_key(level)
    }

    /// Every value whose filter matches `topic`, applying the `$` rule.
    pub fn matching(&self, topic: &str, out: &mut Vec<V>) {
        if let Some(values) = self.exact.get(topic) {
            out.extend(values.iter().cloned());
        }
        if self.wildcard_filters == 0 {
            return;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        collect(&self.root, &levels, 0, dollar, out);
    }

    /// Whether any filter matches `topic` (as [`FilterTrie::matching`], without collecting).
    pub fn matches_any(&self, topic: &str) -> bool {
        if !self.may_match_ending(last_level(topic)) {
            return false;
        }
        if self.exact.contains_key(topic) {
            return true;
        }
        if self.wildcard_filters == 0 {
            return false;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        any_match(&self.root, &levels, 0, topic.starts_with('$'))
    }

    /// Number of (filter, value) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn remove_at<V: PartialEq>(node: &mut Node<V>, levels: &[&str], value: &V) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return remove_value(&mut node.here, value);
    };
    if *first == "#" && rest.is_empty() {
        return remove_value(&mut node.multi, value);
    }
    let child = if *first == "+" {
        node.plus.as_deref_mut()
    } else {
        node.children.get_mut(*first)
    };
    let Some(child) = child else {
        return false;
    };
    let removed = remove_at(child, rest, value);
    if child.is_empty() {
        if *first == "+" {
            node.plus = None;
        } else {
            node.children.remove(*first);
        }
    }
    removed
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.here.is_empty()
            && self.multi.is_empty()
    }
}

fn remove_value<V: PartialEq>(values: &mut Vec<V>, value: &V) -> bool {
    match values.iter().position(|v| v == value) {
        Some(i) => {
            values.swap_remove(i);
            true
        }
        None => false,
    }
}

fn collect<V: Clone>(
    node: &Node<V>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    out: &mut Vec<V>,
) {
    // At the root of a `$` topic, wildcards must not match the first level.
    let wildcards_allowed = !(depth == 0 && dollar);
    if wildcards_allowed {
        // `a/#` also matches `a` itself: the parent level.
        out.extend(node.multi.iter().cloned());
    }
    let Some((level, rest)) = levels.split_first() else {
        out.extend(node.here.iter().cloned());
        return;
    };
    if let Some(child) = node.children.get(*level) {
        collect(child, rest, depth + 1, dollar, out);
    }
    if wildcards_allowed {
        if let Some(child) = node.plus.as_deref() {
            collect(child, rest, depth + 1, dollar, out);
        }
    }
}

/// Whether a (validated) filter holds `+` or `#`, so it can match more than one topic.
fn has_wildcard(filter: &str) -> bool {
    filter.split('/').any(|level| level == "+" || level == "#")
}

/// The last level of a topic or filter.
fn last_level(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

fn any_match<V>(node: &Node<V>, levels: &[&str], depth: usize, dollar: bool) -> bool {
    let wildcards_allowed = !(depth == 0 && dollar);
    if wildcards_allowed && !node.multi.is_empty() {
        return true;
    }
    let Some((level, rest)) = levels.split_first() else {
        return !node.here.is_empty();
    };
    node.children
        .get(*level)
        .is_some_and(|child| any_match(child, rest, depth + 1, dollar))
        || (wildcards_allowed
            && node
                .plus
                .as_deref()
                .is_some_and(|child| any_match(child, rest, depth + 1, dollar)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_intersect_when_some_topic_matches_both() {
        let cases = [
            ("a/secret", "a/#", true),
            ("a/secret", "a/+", true),
            ("a/+/c", "a/b/+", true),
            ("a/#", "a", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b/c", false),
            ("#", "$SYS/x", false),
            ("$SYS/#", "$SYS/+", true),
        ];
        for (a, b, expected) in cases {
            assert_eq!(intersects(a, b), expected, "{a} ∩ {b}");
            assert_eq!(intersects(b, a), expected, "{b} ∩ {a}");
        }
    }

    #[test]
    fn a_filter_covers_another_only_if_it_matches_everything_the_other_can() {
        let cases = [
            ("a/#", "a/+/b", true),
            ("a/#", "a", true),
            ("a/#", "a/#", true),
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("#", "a/#", true),
            ("a/+", "a/#", false),
            ("a/+", "a/b/c", false),
            ("a/b", "a/+", false),
            ("a", "a/#", false),
            ("+/b", "$SYS/b", false),
            ("#", "$SYS/#", false),
            ("$SYS/#", "$SYS/x", true),
            ("devices/c1/#", "devices/#", false),
        ];
        for (outer, inner, expected) in cases {
            assert_eq!(covers(outer, inner), expected, "{outer} covers {inner}");
        }
    }

    #[test]
    fn filters_match_topics_by_the_spec() {
        let cases = [
            ("a/b/c", "a/b/c", true),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+", "a", true),
            ("+", "a/b", false),
            ("+/+", "/a", true),
            ("a/b", "a/b/c", false),
            ("#", "$SYS/x", false),
            ("+/things/t1", "$emqx/things/t1", false),
            (
                "$emqx/things/+/shadow/update",
                "$emqx/things/t1/shadow/update",
                true,
            ),
            ("$emqx/#", "$emqx/things/t1", true),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(matches(filter, topic), expected, "{filter} ~ {topic}");
            let mut trie = FilterTrie::default();
            trie.insert(filter, 1u32);
            let mut out = Vec::new();
            trie.matching(topic, &mut out);
            assert_eq!(!out.is_empty(), expected, "trie: {filter} ~ {topic}");
        }
    }

    #[test]
    fn invalid_names_and_filters_are_refused() {
        assert_eq!(validate_topic_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_name("a\0b"), Err(TopicError::Nul));
        for bad in ["a/b#", "a/#/b", "a+/b", "++"] {
            assert_eq!(validate_filter(bad), Err(TopicError::BadWildcard), "{bad}");
        }
        for good in ["#", "+", "a/+/b/#", "/", "$emqx/things/+/shadow/#"] {
            assert!(validate_filter(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn shared_subscriptions_parse_into_group_and_filter() {
        assert_eq!(
            parse_filter("$share/g1/a/+").expect("shared"),
            ParsedFilter {
                share_group: Some("g1".into()),
                filter: "a/+".into()
            }
        );
        for bad in ["$share/g1", "$share//a", "$share/g+/a", "$share/g/a#"] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_trie_finds_every_match_once_and_forgets_removed_filters() {
        let mut trie = FilterTrie::default();
        assert!(trie.insert("a/b", "exact"));
        assert!(!trie.insert("a/b", "exact"), "duplicate");
        trie.insert("a/+", "plus");
        trie.insert("a/#", "hash");
        trie.insert("#", "all");
        trie.insert("b/#", "other");
        let mut out = Vec::new();
        trie.matching("a/b", &mut out);
        out.sort();
        assert_eq!(out, ["all", "exact", "hash", "plus"]);
        assert!(trie.remove("a/+", &"plus"));
        assert!(!trie.remove("a/+", &"plus"));
        out.clear();
        trie.matching("a/b", &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(trie.len(), 4);
    }

    /// `matches_any` answers exactly whether `matching` finds something, `$` rule included.
    #[test]
    fn the_trie_knows_whether_anything_matches_without_collecting() {
        let mut trie = FilterTrie::default();
        for (filter, value) in [
            ("a/b", 1),
            ("a/+/c", 2),
            ("x/#", 3),
            ("+/y", 4),
            ("$aws/things/t/shadow/update/documents", 5),
            ("$SYS/#", 6),
        ] {
            trie.insert(filter, value);
        }
        let topics = [
            "a/b",
            "a/q/c",
            "a/q",
            "x",
            "x/1/2",
            "q/y",
            "q/z",
            "a",
            "$aws/things/t/shadow/update/documents",
            "$aws/things/u/shadow/update/documents",
            "$x/y",
            "$SYS/load",
            "b/b",
        ];
        for topic in topics {
            let mut out = Vec::new();
            trie.matching(topic, &mut out);
            assert_eq!(trie.matches_any(topic), !out.is_empty(), "{topic}");
        }
        assert!(
            trie.matches_any("q/y") && !trie.matches_any("$x/y"),
            "`+` never matches a `$` first level"
        );
        assert!(trie.remove("+/y", &4));
        assert!(!trie.matches_any("q/y"));
        // Known from the last level alone: a wildcard ending matches any, a literal only itself.
        assert!(trie.may_match_ending("documents"), "x/# ends in a wildcard");
        assert!(trie.remove("x/#", &3) && trie.remove("$SYS/#", &6));
        assert!(trie.may_match_ending("documents") && trie.may_match_ending("c"));
        assert!(!trie.may_match_ending("y") && !trie.may_match_ending("accepted"));
        assert!(trie.remove("$aws/things/t/shadow/update/documents", &5));
        assert!(!trie.may_match_ending("documents"));
        assert!(!trie.matches_any("$aws/things/t/shadow/update/documents"));
        trie.insert("a/b/+", 7);
        assert!(
            trie.may_match_ending("documents"),
            "+ ends match any last level"
        );
    }
}
