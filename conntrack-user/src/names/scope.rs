//! Which namespaces a command reports on: all of them, or those named
//! with `--netns`.
use std::collections::HashSet;

use crate::source::netns::{self, NetnsError, NetnsInfo};

#[derive(Debug, Clone, Default)]
pub(crate) struct Scope {
    /// `None`: every namespace.
    only: Option<HashSet<u32>>,
    named: Vec<NetnsInfo>,
}

impl Scope {
    pub(crate) fn from_specs(specs: &[String]) -> Result<Self, NetnsError> {
        if specs.is_empty() {
            return Ok(Self::default());
        }
        let named: Vec<NetnsInfo> = specs
            .iter()
            .map(|s| netns::resolve(s))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            only: Some(named.iter().map(|n| n.inum).collect()),
            named,
        })
    }

    pub(crate) fn contains(&self, inum: u32) -> bool {
        self.only.as_ref().is_none_or(|s| s.contains(&inum))
    }

    pub(crate) fn is_narrowed(&self) -> bool {
        self.only.is_some()
    }

    /// The namespaces to read counters from, as of now.
    pub(crate) fn namespaces(&self) -> Result<Vec<NetnsInfo>, NetnsError> {
        if self.only.is_some() {
            return Ok(self.named.clone());
        }
        netns::list()
    }
}
