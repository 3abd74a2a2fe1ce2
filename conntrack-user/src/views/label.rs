//! The one formatter of process labels. Every view names a process the
//! same way, `comm[pid]`, and differs only in where it puts the role and
//! whether it adds the container.
use crate::{aggregate::breakdown::Item, names::resolver::Process};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Label<'a> {
    name: &'a str,
    pid: Option<u32>,
    role: Option<&'a str>,
}

impl<'a> From<&'a Process> for Label<'a> {
    fn from(p: &'a Process) -> Self {
        Label {
            name: &p.name,
            pid: p.pid,
            role: p.role,
        }
    }
}

impl<'a> From<&'a Item> for Label<'a> {
    fn from(i: &'a Item) -> Self {
        Label {
            name: &i.key,
            pid: i.pid,
            role: i.role,
        }
    }
}

impl Label<'_> {
    /// `ctpeer[42]`: unique per process, what Prometheus labels carry.
    pub(crate) fn short(&self) -> String {
        match self.pid {
            Some(p) => format!("{}[{p}]", self.name),
            None => self.name.to_string(),
        }
    }

    /// `ctpeer[42] (listener)`: a row of a report list.
    pub(crate) fn row(&self) -> String {
        match self.role {
            Some(r) => format!("{} ({r})", self.short()),
            None => self.short(),
        }
    }

    /// `listener ctpeer[42]`: the end of a drop line.
    pub(crate) fn line(&self) -> String {
        match self.role {
            Some(r) => format!("{r} {}", self.short()),
            None => self.short(),
        }
    }

    /// `ctpeer[42] listener · pod default/web`: a `top` row. A placeholder
    /// such as `(no listener)` needs no role beside it.
    pub(crate) fn live(&self, container: Option<&str>) -> String {
        let mut s = self.short();
        if let (Some(r), Some(_)) = (self.role, self.pid) {
            s.push(' ');
            s.push_str(r);
        }
        if let Some(c) = container {
            s.push_str(" · ");
            s.push_str(c);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_style_of_one_process() {
        let p = Process {
            name: "ctpeer".into(),
            pid: Some(42),
            role: Some("listener"),
        };
        let l = Label::from(&p);
        assert_eq!(l.short(), "ctpeer[42]");
        assert_eq!(l.row(), "ctpeer[42] (listener)");
        assert_eq!(l.line(), "listener ctpeer[42]");
        assert_eq!(l.live(Some("pod a/b")), "ctpeer[42] listener · pod a/b");
        let nobody = Process {
            name: "(no listener)".into(),
            pid: None,
            role: Some("listener"),
        };
        assert_eq!(Label::from(&nobody).live(None), "(no listener)");
        assert_eq!(Label::from(&nobody).line(), "listener (no listener)");
    }
}
