//! Task keys and typed ids.
//!
//! A [`Key`] is the user-facing, stable name of a task (a workflow file's task name, or a content
//! hash for lazy calls). A [`TaskId`] is the dense index of a task inside one [`crate::Graph`]:
//! schedulers index plain vectors with it, so the hot path never hashes a string.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// The stable name of a task. Cheap to clone (one `Arc`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// Creates a key from a name.
    #[must_use]
    pub fn new(name: &str) -> Self {
        Key(Arc::from(name))
    }

    /// The key as a string slice.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The task prefix, as Dask groups tasks: the part before the first `-` (or the whole key).
    #[must_use]
    pub fn prefix(&self) -> &str {
        self.0.split_once('-').map_or(&self.0, |(p, _)| p)
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Key::new(s)
    }
}

impl From<String> for Key {
    fn from(s: String) -> Self {
        Key(Arc::from(s))
    }
}

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// On the wire a key is its string: encoding borrows it, and decoding allocates the shared
/// string once (not a `String` that is then copied into an `Arc`), since every task message
/// carries keys.
impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a task key (string)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key::new(v))
            }
        }
        d.deserialize_str(V)
    }
}

/// Dense index of a task within one graph. Only meaningful together with that graph.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TaskId(pub u32);

impl TaskId {
    /// The id as a vector index.
    #[inline]
    #[must_use]
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

/// Dense index of an op name within one graph (op names are interned per graph, so a million
/// `noop` tasks share one string and executors resolve each op to a function once).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct OpId(pub u32);

impl OpId {
    /// The id as a vector index.
    #[inline]
    #[must_use]
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}
