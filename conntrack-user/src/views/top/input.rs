//! The terminal's input as `top` actions: keys change the view, a resize
//! redraws it.
use crossterm::event::{Event, KeyCode, KeyEventKind, KeyModifiers};

use super::model::{Action, View};

/// What a terminal event asks of the view.
pub(crate) fn action(ev: Event, view: &mut View) -> Action {
    match ev {
        Event::Key(k) if k.kind != KeyEventKind::Release => match k.code {
            // Raw mode turns Ctrl-C into a key, not a signal.
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Action::Quit,
            KeyCode::Char(c) => view.on_key(c),
            KeyCode::Esc => Action::Quit,
            _ => Action::Ignore,
        },
        Event::Resize(..) => Action::Redraw,
        _ => Action::Ignore,
    }
}
