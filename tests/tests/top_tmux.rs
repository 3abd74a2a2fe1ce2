//! `ctwatch top` driven the way a person uses it: in a real terminal (a
//! detached tmux session of fixed size), reading the screen, pressing keys.
//! Root, serial (`--test-threads=1`); needs tmux (`cargo xtask setup`).
use std::{
    process::Command,
    time::{Duration, Instant},
};

use ctwatch_tests::*;

const HOLD_PORT: u16 = 7400;

/// Whether tmux runs here; where privileged tests are required, its
/// absence is a failure rather than a skip.
fn have_tmux() -> bool {
    let why = match Command::new("tmux").arg("-V").output() {
        Ok(o) if o.status.success() => return true,
        // tmux refuses to start without a UTF-8 locale, for one.
        Ok(o) => format!(
            "tmux does not run: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(_) => "tmux is not installed (cargo xtask setup installs it)".to_string(),
    };
    assert!(
        std::env::var_os("CTWATCH_REQUIRE_PRIVILEGED").is_none(),
        "{why}"
    );
    eprintln!("SKIP top_tmux: {why}");
    false
}

/// A tmux server of our own (its own socket, no user config), killed on drop
/// together with whatever still runs in it.
struct Tmux {
    socket: String,
    session: String,
    dir: std::path::PathBuf,
}

impl Tmux {
    /// Runs `cmd` in a detached 160x50 session, then the shell code
    /// `after`; the command's stderr and exit code land in files, so a
    /// failure can be explained.
    fn start(tag: &str, cmd: &str, after: &str) -> Self {
        let socket = format!("ctwtop{}-{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&socket);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t = Tmux {
            session: socket.clone(),
            socket,
            dir,
        };
        let wrapped = format!(
            "{cmd} 2>{err}; echo $? >{code}{after}",
            err = t.dir.join("stderr").display(),
            code = t.dir.join("code").display()
        );
        let out = t
            .tmux()
            .args([
                "new-session",
                "-d",
                "-s",
                &t.session,
                "-x",
                "160",
                "-y",
                "50",
                &wrapped,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        // -u: the screen is drawn with box and block characters.
        c.args(["-u", "-L", &self.socket, "-f", "/dev/null"]);
        c
    }

    fn alive(&self) -> bool {
        self.tmux()
            .args(["has-session", "-t", &self.session])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn screen(&self) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let ok = self
            .tmux()
            .args(["send-keys", "-t", &self.session, keys])
            .status()
            .unwrap()
            .success();
        assert!(ok, "tmux send-keys {keys}");
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn exit_code(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("code"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// PID of the program the pane's shell runs.
    fn child_pid(&self, comm: &str) -> Option<u32> {
        let out = self
            .tmux()
            .args(["display-message", "-p", "-t", &self.session, "#{pane_pid}"])
            .output()
            .ok()?;
        let shell: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // comm may hold spaces: fields resume after the last ')'.
            let (head, rest) = stat.rsplit_once(") ")?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == shell && head.ends_with(&format!("({comm}"))).then_some(pid)
        })
    }

    /// Polls the screen until `ok` holds; panics with the screen and stderr
    /// after `within`.
    fn wait_for(&self, what: &str, within: Duration, mut ok: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            if Instant::now() > deadline || !self.alive() {
                panic!(
                    "{what}: not on screen within {within:?} (session alive: {})\n--- screen ---\n{s}\n--- stderr ---\n{}",
                    self.alive(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The screen lines from the victims panel's title to its bottom border.
fn victims(screen: &str) -> Vec<&str> {
    let lines: Vec<&str> = screen.lines().collect();
    let Some(start) = lines.iter().position(|l| l.contains("Victims:")) else {
        return vec![];
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.contains('└'))
        .map(|e| start + 1 + e)
        .unwrap_or(lines.len());
    lines[start..end].to_vec()
}

/// The first cell of a table line (`│ key   …`).
fn first_cell(line: &str) -> &str {
    line.trim_start_matches(['│', ' '])
        .split("  ")
        .next()
        .unwrap_or("")
        .trim()
}

#[test]
fn top_names_the_flood_switches_dimensions_and_quits_clean() {
    require_env!();
    if !have_tmux() {
        return;
    }
    const MAX: usize = 16;
    let lab = Lab::new("top", false);
    let _max = MaxGuard::set(MAX as u64);
    let _held = lab.fill(MAX, HOLD_PORT);
    let cmd = format!(
        "{} top --mode {} --netns {} --interval 0.5 --dump-interval 2",
        ctwatch_bin().display(),
        mode(),
        lab.srv.name
    );
    let t = Tmux::start("flood", &cmd, "");
    // The status lines are drawn last: a screen with them has the whole
    // frame, where one captured in the middle of its writes may not.
    let note = "occupancy refreshes from ctnetlink every 2s";
    let first = t.wait_for("the live view", Duration::from_secs(30), |s| {
        s.contains("Victims:")
            && s.contains(&lab.srv.name)
            && s.contains(&format!("mode {}", mode()))
            && (mode() != "tracepoint" || s.contains(note))
    });
    assert!(first.contains(&format!("{} mode", mode())), "{first}");
    let pid = t.child_pid("ctwatch").expect("ctwatch runs in the pane");
    let ours = programs_held_by(pid);
    assert!(!ours.is_empty(), "ctwatch holds no BPF programs");
    assert_eq!(still_loaded(&ours), ours, "bpftool should list them");

    // The flood goes on until the screen names it (or ~15 s pass).
    let flood = || {
        lab.cli.peer_run(&["udp-send", "198.18.0.1:5353", "200"]);
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut screen;
    loop {
        flood();
        screen = t.screen();
        let v = victims(&screen);
        if v.iter()
            .any(|l| l.contains("198.18.0.2") && l.contains("udp/5353"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flood never showed among victims\n{screen}\n--- stderr ---\n{}",
            t.stderr()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The namespace row says the table is full, and the culprits hold it.
    let ns_line = screen
        .lines()
        .find(|l| l.contains(&lab.srv.name))
        .unwrap_or_else(|| panic!("no namespace row\n{screen}"));
    assert!(
        ns_line.contains(&format!("{MAX}/{MAX}")) && ns_line.contains("full"),
        "{ns_line}\n{screen}"
    );

    // Keys switch the dimension of every panel, victims included.
    t.keys("s");
    flood();
    t.wait_for("victims by source IP", Duration::from_secs(10), |s| {
        s.contains("Victims: table-full drops, by source IP")
            && victims(s).iter().any(|l| first_cell(l) == "198.18.0.2")
    });
    t.keys("o");
    flood();
    let by_port = t.wait_for("victims by port", Duration::from_secs(10), |s| {
        victims(s).iter().any(|l| first_cell(l) == "udp/5353")
    });
    // The held TCP entries are the occupancy culprits.
    t.wait_for("occupancy by port", Duration::from_secs(10), |s| {
        s.lines()
            .any(|l| l.contains("tcp/7400") && l.contains(&MAX.to_string()))
    });
    t.keys("/");
    flood();
    t.wait_for("victims by source /24", Duration::from_secs(10), |s| {
        victims(s).iter().any(|l| first_cell(l) == "198.18.0.0/24")
    });
    eprintln!("{by_port}");

    // q quits: the session ends, ctwatch exits 0 and its programs are gone.
    t.keys("q");
    poll_until(Duration::from_secs(10), || !t.alive());
    assert!(!t.alive(), "ctwatch top did not exit on q\n{}", t.screen());
    assert_eq!(t.exit_code(), Some(0), "stderr: {}", t.stderr());
    // The last fd close only queues the programs' release (links are freed
    // after an RCU grace period), so give the kernel a moment.
    poll_until(Duration::from_secs(10), || still_loaded(&ours).is_empty());
    assert!(
        still_loaded(&ours).is_empty(),
        "programs {:?} still loaded after exit: {:?}",
        still_loaded(&ours),
        ctwatch_programs()
    );
}

#[test]
fn top_refuses_a_pipe_with_one_line() {
    require_env!();
    let (code, out, err) = ctwatch_once(&["top", "--mode", &mode()]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("needs a terminal"), "{err}");
    assert!(
        err.contains("report --json") && err.contains("drops"),
        "{err}"
    );
}

#[test]
fn top_restores_the_terminal_on_sigterm() {
    require_env!();
    if !have_tmux() {
        return;
    }
    let lab = Lab::new("topterm", false);
    let cmd = format!(
        "{} top --mode {} --netns {}",
        ctwatch_bin().display(),
        mode(),
        lab.srv.name
    );
    let t = Tmux::start("term", &cmd, "; echo SHELL-BACK; sleep 30");
    t.wait_for("the live view", Duration::from_secs(30), |s| {
        s.contains("Victims:")
    });
    let pid = t.child_pid("ctwatch").expect("ctwatch runs in the pane");
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    // Back on the normal screen: the shell's line shows, the view is gone.
    let s = t.wait_for("the shell after SIGTERM", Duration::from_secs(10), |s| {
        s.contains("SHELL-BACK")
    });
    assert!(!s.contains("Victims:"), "alternate screen not left:\n{s}");
    assert_eq!(t.exit_code(), Some(0), "stderr: {}", t.stderr());
    // Raw mode is off again: the tty echoes and translates newlines.
    let stty = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "stty -a < $(tmux -L {} display-message -p -t {} '#{{pane_tty}}')",
            t.socket, t.session
        ))
        .output()
        .unwrap();
    let modes = String::from_utf8_lossy(&stty.stdout);
    assert!(
        modes.contains(" icanon") && modes.contains(" echo"),
        "{modes}"
    );
}
