//! Validation errors. These are *user* errors (bad input), kept apart from task failures
//! ([`crate::TaskError`]) and from internal bugs.

use std::fmt;

use crate::Key;

/// One problem found while validating a graph.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// Two tasks have the same key.
    #[error("duplicate task key {key}")]
    DuplicateKey {
        /// The repeated key.
        key: Key,
    },
    /// A task refers to a key that is not in the graph.
    #[error("task {key} depends on missing key {missing}")]
    MissingDependency {
        /// The task holding the reference.
        key: Key,
        /// The key it refers to.
        missing: Key,
    },
    /// The graph has a cycle; each key depends on the next, the last on the first.
    #[error("dependency cycle: {}", cycle_text(keys))]
    Cycle {
        /// The keys on the cycle.
        keys: Vec<Key>,
    },
    /// A requested output is not a task of the graph.
    #[error("unknown output key {key}")]
    UnknownOutput {
        /// The requested key.
        key: Key,
    },
}

fn cycle_text(keys: &[Key]) -> String {
    let mut s: Vec<String> = keys.iter().map(ToString::to_string).collect();
    if let Some(first) = keys.first() {
        s.push(first.to_string());
    }
    s.join(" -> ")
}

/// Every problem found in one graph, in the order they were found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct GraphErrors(pub Vec<GraphError>);

impl fmt::Display for GraphErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 20;
        for (i, e) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        if self.0.len() > SHOWN {
            write!(f, "\n... and {} more problems", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}
