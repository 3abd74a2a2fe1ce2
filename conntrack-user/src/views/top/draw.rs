//! Draws one frame of `ctwatch top` from the [`model::Model`]: namespaces
//! with fill and rates, culprits, victims and a footer of counters.
use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row, Table},
    DefaultTerminal, Frame,
};

use crate::aggregate::occupancy::DUMP_BUDGET;
use crate::views::top::model::{self, fmt_num, Model, NsRow, Rate};

/// Width of the fill bar, in cells.
const BAR: usize = 10;
/// Namespace rows shown at most (the fullest first).
const MAX_NS_ROWS: usize = 20;

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn dim() -> Style {
    Style::default().fg(Color::DarkGray)
}

fn fill_color(f: f64) -> Color {
    if f >= 0.9 {
        Color::Red
    } else if f >= 0.7 {
        Color::Yellow
    } else {
        Color::Green
    }
}

/// `██████░░░░  60%`
pub fn fill_bar(fill: f64) -> String {
    let f = fill.clamp(0.0, 1.0);
    let n = ((f * BAR as f64).round() as usize).min(BAR);
    format!(
        "{}{} {:>4.0}%",
        "█".repeat(n),
        "░".repeat(BAR - n),
        fill * 100.0
    )
}

fn opt_rate(r: Option<f64>) -> String {
    r.map(fmt_num).unwrap_or_else(|| "-".into())
}

fn show_rate(r: Rate) -> String {
    match r {
        Rate::Exact(v) => fmt_num(v),
        Rate::AtLeast(v) => format!("≥{}", fmt_num(v)),
        Rate::Unknown => "-".into(),
    }
}

/// Below this width the namespace table drops buckets, net/s and the bar.
const WIDE: u16 = 130;
/// Columns the narrow namespace table leaves out (buckets, net/s).
const NARROW_SKIP: [usize; 2] = [3, 6];

fn ns_row(r: &NsRow, wide: bool) -> Row<'static> {
    let count = match (r.count, r.max) {
        (Some(c), Some(m)) => format!("{c}/{m}"),
        _ => "?".into(),
    };
    let fill = match r.fill {
        Some(f) if !wide => {
            Cell::from(format!("{:.0}%", f * 100.0)).style(Style::default().fg(fill_color(f)))
        }
        Some(f) => Cell::from(fill_bar(f)).style(Style::default().fg(fill_color(f))),
        None => Cell::from(r.error.clone().unwrap_or_else(|| "unreadable".into())).style(dim()),
    };
    let to_full_style = match r.to_full {
        model::TimeToFull::Full => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        model::TimeToFull::In(s) if s < 300.0 => Style::default().fg(Color::Yellow),
        _ => Style::default(),
    };
    let drops = |v: Option<f64>| {
        let s = opt_rate(v);
        let style = if v.unwrap_or(0.0) > 0.0 {
            Style::default().fg(Color::Red)
        } else {
            Style::default()
        };
        Cell::from(s).style(style)
    };
    let cells = vec![
        Cell::from(r.label.clone()),
        Cell::from(count),
        fill,
        Cell::from(
            r.buckets
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        Cell::from(show_rate(r.new_per_s)),
        Cell::from(show_rate(r.freed_per_s)),
        Cell::from(
            r.net_per_s
                .map(|v| format!("{v:+.0}"))
                .unwrap_or_else(|| "-".into()),
        ),
        Cell::from(r.to_full.to_string()).style(to_full_style),
        drops(r.kernel_drops_per_s),
        drops(r.full_drops_per_s),
    ];
    Row::new(narrow(cells, wide))
}

fn narrow<T>(cols: Vec<T>, wide: bool) -> Vec<T> {
    cols.into_iter()
        .enumerate()
        .filter(|(i, _)| wide || !NARROW_SKIP.contains(i))
        .map(|(_, c)| c)
        .collect()
}

fn namespaces(f: &mut Frame, area: Rect, m: &Model) {
    let rows = m.ns_rows();
    let wide = area.width >= WIDE;
    let header = Row::new(narrow(
        vec![
            "netns",
            "count/max",
            "fill",
            "buckets",
            "new/s",
            "freed/s",
            "net/s",
            "full in",
            "drops/s",
            "full-drops/s",
        ],
        wide,
    ))
    .style(bold());
    let widths = narrow(
        vec![
            Constraint::Min(12),
            Constraint::Length(if wide { 15 } else { 13 }),
            Constraint::Length(if wide { BAR as u16 + 6 } else { 5 }),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Length(12),
        ],
        wide,
    );
    let mut body: Vec<Row> = rows
        .iter()
        .take(MAX_NS_ROWS)
        .map(|r| ns_row(r, wide))
        .collect();
    if body.is_empty() {
        body.push(Row::new(vec![Cell::from(
            "no namespace uses conntrack yet (count 0, no drops)",
        )
        .style(dim())]));
    }
    let title = if rows.len() > MAX_NS_ROWS {
        format!(" Namespaces (fullest {MAX_NS_ROWS} of {}) ", rows.len())
    } else {
        " Namespaces ".to_string()
    };
    f.render_widget(
        Table::new(body, widths)
            .header(header)
            .block(Block::bordered().title(Span::styled(title, bold()))),
        area,
    );
}

/// A ranked table: key, a rate column, a count column, share, and
/// optionally the heaviest flow behind each row.
struct Ranked<'a> {
    title: String,
    rate_col: Option<&'a str>,
    total_col: &'a str,
    with_flow: bool,
    empty: &'a str,
}

fn ranked(f: &mut Frame, area: Rect, spec: Ranked, rows: &[model::Row]) {
    let mut head = vec!["key"];
    if let Some(r) = spec.rate_col {
        head.push(r);
    }
    head.push(spec.total_col);
    head.push("share");
    if spec.with_flow {
        head.push("heaviest flow");
    }
    let mut widths = vec![Constraint::Min(18)];
    if spec.rate_col.is_some() {
        widths.push(Constraint::Length(9));
    }
    widths.push(Constraint::Length(9));
    widths.push(Constraint::Length(6));
    if spec.with_flow {
        widths.push(Constraint::Min(24));
    }
    let mut body: Vec<Row> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![Cell::from(r.key.clone())];
            if spec.rate_col.is_some() {
                cells.push(Cell::from(fmt_num(r.rate)));
            }
            cells.push(Cell::from(r.total.to_string()));
            cells.push(Cell::from(format!("{:.0}%", r.share * 100.0)));
            if spec.with_flow {
                cells.push(Cell::from(r.flow.clone()).style(dim()));
            }
            let style = if r.key == crate::aggregate::topk::OTHER {
                dim()
            } else {
                Style::default()
            };
            Row::new(cells).style(style)
        })
        .collect();
    if body.is_empty() {
        body.push(Row::new(vec![
            Cell::from(spec.empty.to_string()).style(dim())
        ]));
    }
    f.render_widget(
        Table::new(body, widths)
            .header(Row::new(head).style(bold()))
            .block(Block::bordered().title(Span::styled(spec.title, bold()))),
        area,
    );
}

fn footer(f: &mut Frame, area: Rect, m: &Model, now: f64) {
    let ft = m.footer();
    let per_s = |v: Option<f64>| {
        v.map(|x| format!(" ({}/s)", fmt_num(x)))
            .unwrap_or_default()
    };
    let mut spans = vec![
        Span::styled("evictions ", bold()),
        Span::raw(format!("{}{}", ft.evictions, per_s(ft.evictions_per_s))),
        Span::raw("  ·  "),
        Span::styled("clashes ", bold()),
        Span::raw(format!("{}{}", ft.clashes, per_s(ft.clashes_per_s))),
        Span::raw("  ·  "),
        Span::styled("lost events ", bold()),
        Span::styled(
            ft.lost_events.to_string(),
            if ft.lost_events > 0 {
                Style::default().fg(Color::Red)
            } else {
                Style::default()
            },
        ),
    ];
    // Only when there are some: calls the kernel kept from the programs,
    // not records lost on the way.
    for (label, n) in [
        ("probe returns missed ", ft.returns_missed),
        ("runs skipped ", ft.runs_skipped),
    ] {
        if n > 0 {
            spans.push(Span::raw("  ·  "));
            spans.push(Span::styled(label, bold()));
            spans.push(Span::styled(n.to_string(), Style::default().fg(Color::Red)));
        }
    }
    if let Some(fr) = ft.freed_per_s {
        spans.push(Span::raw("  ·  "));
        // The kernel-probe counter is host-wide, not per namespace.
        spans.push(Span::styled("freed (all netns) ", bold()));
        spans.push(Span::raw(format!("{}/s", fmt_num(fr))));
    }
    spans.push(Span::raw("  ·  "));
    spans.push(Span::styled("mode ", bold()));
    spans.push(Span::raw(m.status.mode.clone()));
    let source = match m.status.dump_interval_s {
        Some(period) => {
            let age = m
                .occupancy_age(now)
                .map(|a| format!("last {} ago", model::fmt_secs(a)))
                .unwrap_or_else(|| "first dump pending".into());
            let every = m.status.dump_every_s.unwrap_or(period);
            let paced = if every > period {
                format!(
                    ", spaced to stay under {}% of a core",
                    fmt_num((DUMP_BUDGET * 100.0).round())
                )
            } else {
                String::new()
            };
            format!(
                "tracepoint mode: occupancy refreshes from ctnetlink every {}{paced} ({age}); \
                 per-netns new/freed are bounds from the count's net change",
                model::fmt_secs(every)
            )
        }
        None => {
            "occupancy: kernel probes since attach + one ctnetlink seed of older entries".into()
        }
    };
    let mut lines = vec![Line::from(spans), Line::styled(source, dim())];
    if let Some(n) = m.status.notes.last() {
        let more = m.status.notes.len() - 1;
        let text = if more > 0 {
            format!("{n} (+{more} more)")
        } else {
            n.clone()
        };
        lines.push(Line::styled(text, Style::default().fg(Color::Yellow)));
    }
    f.render_widget(Paragraph::new(lines), area);
}

#[derive(Debug, thiserror::Error)]
#[error("cannot drive the terminal: {0}; check that TERM names a terminal that supports the alternate screen")]
pub(crate) struct TerminalError(#[from] std::io::Error);

/// Raw mode and the alternate screen for as long as it lives, through
/// ratatui's own init, whose panic hook restores the terminal on a panic;
/// restored on drop otherwise.
pub(crate) struct Screen {
    term: DefaultTerminal,
}

impl Screen {
    pub(crate) fn enter() -> Result<Self, TerminalError> {
        match ratatui::try_init() {
            Ok(term) => Ok(Screen { term }),
            Err(e) => {
                ratatui::restore();
                Err(e.into())
            }
        }
    }

    pub(crate) fn draw(&mut self, m: &Model, now: f64) -> Result<(), TerminalError> {
        self.term.draw(|f| draw(f, m, now))?;
        Ok(())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = self.term.show_cursor();
        ratatui::restore();
    }
}

/// Draws the whole screen. `now` is on the same clock as the model's ticks.
fn draw(f: &mut Frame, m: &Model, now: f64) {
    let area = f.area();
    let footer_h = 2 + u16::from(!m.status.notes.is_empty());
    // Namespaces get up to a third of the screen, the two ranked panels
    // share the rest evenly, and nothing is squeezed below its title row.
    let ns_h = (m.ns_rows().len().clamp(1, MAX_NS_ROWS) as u16 + 3).min((area.height / 3).max(4));
    let spare = area.height.saturating_sub(1 + ns_h + footer_h);
    let ranked_h = (spare / 2).clamp(4, m.top_rows() as u16 + 3);
    let [title, ns, culprits, victims, foot, _] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(ns_h),
        Constraint::Length(ranked_h),
        Constraint::Length(ranked_h),
        Constraint::Length(footer_h),
        Constraint::Min(0),
    ])
    .areas(area);

    let by = m.view.title();
    f.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(" ctwatch top ", bold().fg(Color::Cyan)),
            Span::raw(format!(
                "│ {} mode │ kernel {} │ every {}s │ by {by} │ ",
                m.status.mode,
                m.status.kernel,
                fmt_num(m.status.interval_s)
            )),
            Span::styled(
                if area.width >= WIDE {
                    "p process  o proto/port  s source  / prefix  n netns  c pod  q quit"
                } else {
                    "keys: p o s / n q"
                },
                dim(),
            ),
        ])),
        title,
    );
    namespaces(f, ns, m);

    let [occ, new] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
        .areas(culprits);
    let occ_empty = if m.status.dump_interval_s.is_some() {
        "waiting for the first ctnetlink dump…"
    } else {
        "no entries held"
    };
    ranked(
        f,
        occ,
        Ranked {
            title: format!(" Culprits: entries held, by {by} "),
            rate_col: None,
            total_col: "entries",
            with_flow: false,
            empty: occ_empty,
        },
        &m.occupancy_rows(),
    );
    let (title, rate_col, total_col, empty) = if m.sees_entries() {
        (
            format!(" Culprits: new entries/s, by {by} "),
            "new/s",
            "total",
            "no entries created since start",
        )
    } else {
        (
            format!(" Culprits: growth/s between dumps, by {by} "),
            "+/s",
            "+entries",
            "no growth between the last two dumps",
        )
    };
    ranked(
        f,
        new,
        Ranked {
            title,
            rate_col: Some(rate_col),
            total_col,
            with_flow: false,
            empty,
        },
        &m.creation_rows(),
    );
    ranked(
        f,
        victims,
        Ranked {
            title: format!(" Victims: table-full drops, by {by} "),
            rate_col: Some("drops/s"),
            total_col: "total",
            with_flow: true,
            empty: "no table-full drops since start",
        },
        &m.victims(),
    );
    footer(f, foot, m, now);
}

#[cfg(test)]
mod tests {
    use ratatui::{backend::TestBackend, Terminal};

    use super::*;
    use crate::views::top::model::{
        tests::{keys, ns},
        Model, Tick, Totals,
    };

    fn screen(m: &Model, w: u16, h: u16, now: f64) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, m, now)).unwrap();
        let buf = t.backend().buffer();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect()
    }

    fn section<'a>(lines: &'a [String], title: &str) -> &'a [String] {
        let start = lines
            .iter()
            .position(|l| l.contains(title))
            .unwrap_or_else(|| panic!("no {title:?} on screen:\n{}", lines.join("\n")));
        let end = lines[start + 1..]
            .iter()
            .position(|l| l.contains('┌'))
            .map(|e| start + 1 + e)
            .unwrap_or(lines.len());
        &lines[start..end]
    }

    fn tracepoint_model() -> Model {
        let mut m = Model::new(5, false, false);
        m.status.mode = "tracepoint".into();
        m.status.kernel = "6.18.44".into();
        m.status.interval_s = 1.0;
        m.status.dump_interval_s = Some(5.0);
        let flood = keys("(no listener)", "udp/5353", "198.18.0.2", "lab-srv");
        let hold = keys("ctpeer[77] listener", "tcp/7400", "198.18.0.2", "lab-srv");
        let mut a = ns(4026532177, 16, 16);
        a.label = "lab-srv".into();
        a.kernel_drops = Some(0);
        m.push(Tick {
            t: 0.0,
            namespaces: vec![a.clone()],
            ..Default::default()
        });
        a.kernel_drops = Some(400);
        a.full_drops = 400;
        m.push(Tick {
            t: 1.0,
            namespaces: vec![a],
            drops: vec![(flood, 400)],
            totals: Totals::default(),
            ..Default::default()
        });
        m.set_occupancy(1.0, vec![(hold, 16)]);
        m
    }

    #[test]
    fn frame_shows_namespace_culprits_victims_and_footer() {
        let m = tracepoint_model();
        let lines = screen(&m, 160, 50, 3.0);
        let all = lines.join("\n");
        let ns = section(&lines, "Namespaces");
        let row = ns.iter().find(|l| l.contains("lab-srv")).expect(&all);
        assert!(row.contains("16/16"), "{row}");
        assert!(row.contains("██████████  100%"), "{row}");
        assert!(row.contains("full"), "{row}");
        assert!(row.contains("400"), "drops/s: {row}");
        let culprits = section(&lines, "Culprits: entries held");
        assert!(
            culprits
                .iter()
                .any(|l| l.contains("ctpeer[77] listener") && l.contains("16")),
            "{all}"
        );
        let victims = section(&lines, "Victims: table-full drops, by process/cgroup");
        let v = victims
            .iter()
            .find(|l| l.contains("(no listener)"))
            .expect(&all);
        assert!(
            v.contains("400") && v.contains("198.18.0.2 → udp/5353"),
            "{v}"
        );
        assert!(
            all.contains("occupancy refreshes from ctnetlink every 5s (last 2s ago)"),
            "{all}"
        );
        assert!(all.contains("lost events 0"), "{all}");
        assert!(all.contains("mode tracepoint"), "{all}");
    }

    /// A big table's dumps are spaced out by the CPU budget: the footer
    /// says how far apart they really are, and why.
    #[test]
    fn footer_shows_budget_spaced_dumps() {
        let mut m = tracepoint_model();
        m.status.dump_every_s = Some(67.0);
        let all = screen(&m, 200, 50, 3.0).join("\n");
        assert!(
            all.contains(
                "occupancy refreshes from ctnetlink every 1m07s, spaced to stay under 2% of a core (last 2s ago)"
            ),
            "{all}"
        );
    }

    #[test]
    fn switching_dimension_rekeys_every_panel() {
        let mut m = tracepoint_model();
        m.view.on_key('s');
        let lines = screen(&m, 160, 50, 3.0);
        let victims = section(&lines, "Victims: table-full drops, by source IP");
        assert!(victims
            .iter()
            .any(|l| l.contains("198.18.0.2 ") && l.contains("400")));
        m.view.on_key('o');
        let lines = screen(&m, 160, 50, 3.0);
        let victims = section(&lines, "Victims: table-full drops, by proto/dst port");
        assert!(victims.iter().any(|l| l.contains("udp/5353")));
        let occ = section(&lines, "Culprits: entries held, by proto/dst port");
        assert!(occ.iter().any(|l| l.contains("tcp/7400")));
        m.view.on_key('/');
        let lines = screen(&m, 160, 50, 3.0);
        assert!(section(&lines, "Victims")
            .iter()
            .any(|l| l.contains("198.18.0.0/24")));
    }

    #[test]
    fn empty_model_and_small_terminal_do_not_panic() {
        let m = Model::new(10, true, false);
        let lines = screen(&m, 160, 50, 0.0);
        let all = lines.join("\n");
        assert!(all.contains("no namespace uses conntrack yet"), "{all}");
        assert!(all.contains("no table-full drops since start"), "{all}");
        assert!(all.contains("kernel probes since attach"), "{all}");
        for (w, h) in [(80, 24), (20, 5), (1, 1)] {
            screen(&tracepoint_model(), w, h, 1.0);
        }
    }

    #[test]
    fn small_terminal_keeps_every_panel_title() {
        let lines = screen(&tracepoint_model(), 80, 24, 3.0);
        let all = lines.join("\n");
        eprintln!("{all}");
        for title in [
            "ctwatch top",
            "Namespaces",
            "Culprits: entries held",
            "Victims:",
            "evictions",
        ] {
            assert!(all.contains(title), "{title}:\n{all}");
        }
        assert!(
            section(&lines, "Victims:")
                .iter()
                .any(|l| l.contains("(no listener)")),
            "{all}"
        );
    }

    #[test]
    fn kernel_probe_mode_shows_creation_rates_and_notes() {
        let mut m = Model::new(5, true, false);
        m.status.mode = "kprobe".into();
        let web = keys(
            "nginx[12] listener · docker web",
            "tcp/80",
            "198.18.0.9",
            "4026532300",
        );
        let mut a = ns(4026532300, 100, 1000);
        a.created = Some(0);
        m.push(Tick {
            t: 0.0,
            namespaces: vec![a.clone()],
            totals: Totals {
                lost_events: 0,
                freed: Some(0),
                returns_missed: 0,
                runs_skipped: 0,
            },
            ..Default::default()
        });
        a.created = Some(300);
        a.count = Some(200);
        m.push(Tick {
            t: 1.0,
            namespaces: vec![a],
            created: vec![(web.clone(), 300)],
            totals: Totals {
                lost_events: 2,
                freed: Some(200),
                returns_missed: 0,
                runs_skipped: 5,
            },
            ..Default::default()
        });
        m.set_occupancy(1.0, vec![(web, 200)]);
        m.status.notes = vec!["netns 1: gone".into(), "netns 2: no ctnetlink dump".into()];
        let lines = screen(&m, 160, 50, 1.5);
        let all = lines.join("\n");
        let ns_row = lines.iter().find(|l| l.contains("4026532300")).expect(&all);
        // 300 created, count +100: 200 freed; 800 left at +100/s.
        for cell in ["200/1000", "300", "200", "+100", "8s"] {
            assert!(ns_row.contains(cell), "{cell}: {ns_row}");
        }
        let new = section(&lines, "Culprits: new entries/s");
        assert!(
            new.iter()
                .any(|l| l.contains("nginx[12] listener · docker web")),
            "{all}"
        );
        assert!(all.contains("freed (all netns) 200/s"), "{all}");
        assert!(all.contains("lost events 2"), "{all}");
        assert!(all.contains("runs skipped 5"), "{all}");
        assert!(!all.contains("probe returns missed"), "{all}");
        assert!(
            all.contains("netns 2: no ctnetlink dump (+1 more)"),
            "{all}"
        );
    }

    #[test]
    fn fill_bar_rounds_and_clamps() {
        assert_eq!(fill_bar(0.0), "░░░░░░░░░░    0%");
        assert_eq!(fill_bar(0.5), "█████░░░░░   50%");
        assert_eq!(fill_bar(1.2), "██████████  120%");
    }
}
