//! Which Cumulocity device created which child (template 101): `c8ychild/{parent}/{childId}`
//! lists a device's children, `c8yparent/{childThing}` names a child's parent (both in the
//! `kv` tree, written durably before the child's Thing is registered). The child's Thing keeps
//! the `c8y_parent` attribute too; that attribute decides what a device may do, these records
//! serve the listings (`105`, `GET /api/v1/things/{name}/children`) and the routing of a
//! child's operations to the connection of the device above it. A link whose child Thing was
//! deleted is skipped (and dropped when a device's children are counted).

use thinghub_storage::{StorageError, Store};

/// The `kv` prefix of parent -> child records.
pub const CHILD_PREFIX: &str = "c8ychild/";
/// The `kv` prefix of child -> parent records.
pub const PARENT_PREFIX: &str = "c8yparent/";
/// How deep operations are routed up a chain of children (a child of a child ...).
const DEPTH_MAX: usize = 8;

/// Whether a stored child or parent record decodes (`thinghub check`).
pub fn check_stored_link(bytes: &[u8]) -> Result<(), String> {
    std::str::from_utf8(bytes)
        .map(|_| ())
        .map_err(|_| "a Cumulocity child link holds a Thing name".into())
}

/// One child of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    /// Its id under its parent (`s/us/{id}`).
    pub id: String,
    /// Its Thing (`{parent}:{id}`).
    pub thing: String,
}

/// The links, over the store.
#[derive(Clone)]
pub struct Children {
    store: Store,
}

impl Children {
    /// The links kept in `store`.
    pub fn new(store: Store) -> Children {
        Children { store }
    }

    fn child_key(parent: &str, id: &str) -> String {
        format!("{CHILD_PREFIX}{parent}/{id}")
    }

    fn parent_key(child_thing: &str) -> String {
        format!("{PARENT_PREFIX}{child_thing}")
    }

    /// Records (durably) that `parent` has the child `id`, whose Thing is `child_thing`.
    pub async fn link(
        &self,
        parent: &str,
        id: &str,
        child_thing: &str,
    ) -> Result<(), StorageError> {
        self.store.kv_apply_behind(vec![
            (
                Self::child_key(parent, id),
                Some(child_thing.as_bytes().to_vec()),
            ),
            (
                Self::parent_key(child_thing),
                Some(parent.as_bytes().to_vec()),
            ),
        ])?;
        self.store.sync().await
    }

    /// Forgets a link (its child Thing is gone), durable with the next group commit.
    pub fn unlink(&self, parent: &str, id: &str, child_thing: &str) -> Result<(), StorageError> {
        self.store.kv_apply_behind(vec![
            (Self::child_key(parent, id), None),
            (Self::parent_key(child_thing), None),
        ])
    }

    /// The device that created `thing` as its child, if any.
    pub fn parent_of(&self, thing: &str) -> Result<Option<String>, StorageError> {
        Ok(self
            .store
            .kv_get(&Self::parent_key(thing))?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// `parent`'s children, in id order, at most `limit`.
    pub fn of(&self, parent: &str, limit: usize) -> Result<Vec<Child>, StorageError> {
        let prefix = format!("{CHILD_PREFIX}{parent}/");
        Ok(self
            .store
            .kv_scan_prefix(&prefix, limit)?
            .into_iter()
            .map(|(key, thing)| Child {
                id: key[prefix.len()..].to_owned(),
                thing: String::from_utf8_lossy(&thing).into_owned(),
            })
            .collect())
    }

    /// A page of `parent`'s children after the id `after`, in id order (whether each Thing
    /// still exists is the caller's to check), and the cursor to go on with (`None` at the
    /// end).
    pub fn page(
        &self,
        parent: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Child>, Option<String>), StorageError> {
        let prefix = format!("{CHILD_PREFIX}{parent}/");
        let after = after.map(|id| format!("{prefix}{id}"));
        let page = self
            .store
            .kv_scan_prefix_after(&prefix, after.as_deref(), limit)?;
        let items: Vec<Child> = page
            .into_iter()
            .map(|(key, thing)| Child {
                id: key[prefix.len()..].to_owned(),
                thing: String::from_utf8_lossy(&thing).into_owned(),
            })
            .collect();
        let next = (items.len() == limit)
            .then(|| items.last().map(|c| c.id.clone()))
            .flatten();
        Ok((items, next))
    }

    /// Where an operation for `thing` goes: the device at the top of its chain of parents
    /// (the one connected) and the id the row names (the child's id under its own parent;
    /// `thing` itself when it is no child).
    pub fn route(&self, thing: &str) -> Result<(String, String), StorageError> {
        let (mut device, mut id) = (thing.to_owned(), thing.to_owned());
        for depth in 0..DEPTH_MAX {
            let Some(parent) = self.parent_of(&device)? else {
                break;
            };
            if depth == 0 {
                id = device
                    .strip_prefix(&format!("{parent}:"))
                    .unwrap_or(&device)
                    .to_owned();
            }
            device = parent;
        }
        Ok((device, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinghub_storage::StoreConfig;

    #[tokio::test]
    async fn children_are_listed_by_parent_and_route_their_operations_to_the_top_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let children = Children::new(Store::open(&StoreConfig::new(dir.path())).expect("open"));
        // Given a gateway with two children, one of which has a child
        children.link("gw", "s2", "gw:s2").await.expect("link");
        children.link("gw", "s1", "gw:s1").await.expect("link");
        children.link("gw:s1", "x", "gw:s1:x").await.expect("link");
        children.link("gw-2", "s1", "gw-2:s1").await.expect("link");
        // Then each lists its own, in id order
        let ids = |parent| {
            children
                .of(parent, 10)
                .expect("list")
                .into_iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("gw"), ["s1", "s2"]);
        assert_eq!(ids("gw:s1"), ["x"]);
        assert_eq!(ids("gw-2"), ["s1"]);
        assert!(ids("nobody").is_empty());
        let (first, next) = children.page("gw", None, 1).expect("page");
        let child = |id: &str, thing: &str| Child {
            id: id.into(),
            thing: thing.into(),
        };
        assert_eq!(first, [child("s1", "gw:s1")]);
        let (second, next) = children.page("gw", next.as_deref(), 1).expect("page");
        assert_eq!(second, [child("s2", "gw:s2")]);
        let (rest, end) = children.page("gw", next.as_deref(), 1).expect("page");
        assert!(rest.is_empty() && end.is_none());
        // And an operation goes to the top device, naming the child by its id
        assert_eq!(
            children.route("gw:s2").expect("route"),
            ("gw".into(), "s2".into())
        );
        assert_eq!(
            children.route("gw:s1:x").expect("route"),
            ("gw".into(), "x".into())
        );
        assert_eq!(
            children.route("gw").expect("route"),
            ("gw".into(), "gw".into())
        );
        // When a link goes, the child is no longer listed nor routed
        children.unlink("gw", "s2", "gw:s2").expect("unlink");
        assert_eq!(ids("gw"), ["s1"]);
        assert_eq!(
            children.route("gw:s2").expect("route"),
            ("gw:s2".into(), "gw:s2".into())
        );
    }
}
