//! The demo's compact summary: instead of a line per alert (thousands a minute on a fresh
//! fleet), a few lines a person can follow: the twins failing each rule, the violations
//! pending under each rule's grace period, and the alerts of the last minute. On a terminal it
//! is redrawn in place once a second; off a terminal (piped, in CI) it is printed as plain
//! lines every ten seconds. Every alert still goes to the alert file when one is asked for.
//!
//! It reads the service's own `/metrics` on the loopback listener, the counts the apply
//! thread exports (`twinwatch_failing_twins`, `twinwatch_pending_violations`,
//! `twinwatch_alerts_total`, `twinwatch_messages_total`): the summary shows what an operator's
//! dashboard would, and needs nothing from the service's insides.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the terminal summary is redrawn.
const REFRESH: Duration = Duration::from_secs(1);
/// How often the plain summary is printed off a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(10);
/// The window of "alerts in the last minute".
const WINDOW: Duration = Duration::from_secs(60);
/// Rules shown at most (the ones failing most twins first).
const MAX_RULES: usize = 12;

/// The counts of one scrape of `/metrics`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sample {
    /// Twins failing each rule, with the rule's severity.
    pub failing: BTreeMap<String, (String, u64)>,
    /// Violations pending under each rule's grace period.
    pub pending: BTreeMap<String, u64>,
    /// Alerts raised so far: opened, resolved.
    pub opened: u64,
    pub resolved: u64,
    /// Messages consumed so far, every outcome.
    pub messages: u64,
}

impl Sample {
    /// Reads the summary's counts from Prometheus text exposition; other metrics and
    /// malformed lines are skipped.
    pub fn parse(text: &str) -> Sample {
        let mut sample = Sample::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, labels, value)) = split_sample(line) else {
                continue;
            };
            // Gauges and counters are integers here; a float form is rounded down.
            let n = value.max(0.0) as u64;
            match name {
                "twinwatch_failing_twins" => {
                    if let (Some(rule), Some(severity)) =
                        (label(labels, "rule"), label(labels, "severity"))
                    {
                        sample.failing.insert(rule, (severity, n));
                    }
                }
                "twinwatch_pending_violations" => {
                    if let Some(rule) = label(labels, "rule") {
                        sample.pending.insert(rule, n);
                    }
                }
                "twinwatch_alerts_total" => match label(labels, "kind").as_deref() {
                    Some("opened") => sample.opened = n,
                    Some("resolved") => sample.resolved = n,
                    _ => {}
                },
                "twinwatch_messages_total" => sample.messages += n,
                _ => {}
            }
        }
        sample
    }
}

/// `name{labels} value` (labels may be absent), or `None`.
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    match head.split_once('{') {
        Some((name, rest)) => Some((name, rest.strip_suffix('}')?, value)),
        None => Some((head, "", value)),
    }
}

/// The value of label `key` in `a="x",b="y"` (with Prometheus' escapes undone).
fn label(labels: &str, key: &str) -> Option<String> {
    let mut rest = labels;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        if name.trim_start_matches(',') == key {
            return Some(value);
        }
        rest = after[end + 1..].trim_start_matches(',');
    }
    None
}

/// The alerts raised within the last [`WINDOW`], from the counters' history.
#[derive(Debug, Default)]
pub struct Window {
    /// (when, opened so far, resolved so far), oldest first.
    points: VecDeque<(Instant, u64, u64)>,
}

impl Window {
    /// Records a sample taken at `now`; returns the alerts opened and resolved since the
    /// oldest sample within the window.
    pub fn push(&mut self, now: Instant, sample: &Sample) -> (u64, u64) {
        self.points.push_back((now, sample.opened, sample.resolved));
        while self
            .points
            .front()
            .is_some_and(|&(t, _, _)| now.duration_since(t) > WINDOW)
        {
            self.points.pop_front();
        }
        let (opened, resolved) = self
            .points
            .front()
            .map_or((sample.opened, sample.resolved), |&(_, o, r)| (o, r));
        (
            sample.opened.saturating_sub(opened),
            sample.resolved.saturating_sub(resolved),
        )
    }
}

/// The summary's lines: a header, a row per rule failing or pending on some twin (most
/// failing twins first, at most [`MAX_RULES`]), and the alerts of the last minute.
pub fn render(sample: &Sample, last_minute: (u64, u64), alerts_file: Option<&str>) -> Vec<String> {
    let mut rules: Vec<(&str, &str, u64, u64)> = sample
        .failing
        .iter()
        .map(|(rule, (severity, n))| {
            let pending = sample.pending.get(rule).copied().unwrap_or(0);
            (rule.as_str(), severity.as_str(), *n, pending)
        })
        .chain(
            sample
                .pending
                .iter()
                .filter(|(rule, _)| !sample.failing.contains_key(*rule))
                .map(|(rule, n)| (rule.as_str(), "", 0, *n)),
        )
        .filter(|&(_, _, failing, pending)| failing + pending > 0)
        .collect();
    rules.sort_by(|a, b| b.2.cmp(&a.2).then(b.3.cmp(&a.3)).then(a.0.cmp(b.0)));
    let mut lines = vec![
        format!("{} messages consumed", group(sample.messages)),
        format!(
            "{:<48} {:<8} {:>13} {:>8}",
            "rule", "severity", "failing twins", "pending"
        ),
    ];
    let hidden = rules.len().saturating_sub(MAX_RULES);
    for (rule, severity, failing, pending) in rules.into_iter().take(MAX_RULES) {
        lines.push(format!(
            "{rule:<48} {severity:<8} {:>13} {:>8}",
            group(failing),
            group(pending)
        ));
    }
    if hidden > 0 {
        lines.push(format!("... and {hidden} more rules"));
    }
    if lines.len() == 2 {
        lines.push("(no twin fails any rule yet)".into());
    }
    let (opened, resolved) = last_minute;
    lines.push(format!(
        "alerts in the last minute: {} opened, {} resolved; {} opened, {} resolved in all",
        group(opened),
        group(resolved),
        group(sample.opened),
        group(sample.resolved)
    ));
    lines.push(match alerts_file {
        Some(file) => format!("every alert: {file}"),
        None => "every alert: rerun with --alerts-file FILE".into(),
    });
    lines
}

/// `1234567` as `1,234,567`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The summary's thread: started beside the service, stopped (with a last summary) when the
/// service has returned.
pub struct Summary {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Summary {
    /// Starts summarising the service listening on `listen`: redrawn in place when `terminal`,
    /// else printed as plain lines.
    pub fn start(
        listen: SocketAddr,
        terminal: bool,
        alerts_file: Option<String>,
    ) -> std::io::Result<Summary> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("twinwatch-summary".into())
            .spawn({
                let stop = stop.clone();
                move || summarise(listen, terminal, alerts_file.as_deref(), &stop)
            })?;
        Ok(Summary {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread after one last summary.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // A panic in the summary has already been reported; the service's result stands.
            let _ = thread.join();
        }
    }
}

fn summarise(listen: SocketAddr, terminal: bool, alerts_file: Option<&str>, stop: &AtomicBool) {
    let url = format!("http://{listen}/metrics");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let scrape = || -> Option<Sample> {
        let text = agent
            .get(&url)
            .call()
            .ok()?
            .into_body()
            .read_to_string()
            .ok()?;
        Some(Sample::parse(&text))
    };
    let bar = terminal.then(|| {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let mut window = Window::default();
    let mut last = Sample::default();
    let mut last_minute = (0, 0);
    let mut printed = Instant::now();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if let Some(sample) = scrape() {
            last_minute = window.push(Instant::now(), &sample);
            last = sample;
        }
        let lines = render(&last, last_minute, alerts_file);
        match &bar {
            Some(bar) => bar.set_message(lines.join("\n")),
            None if stopping || printed.elapsed() >= PLAIN_EVERY => {
                printed = Instant::now();
                let mut out = std::io::stdout().lock();
                // Standard output gone (a closed pipe): nothing to do but go on serving.
                let _ = writeln!(
                    out,
                    "--- {}\n{}\n",
                    crate::time::Ticks::now(),
                    lines.join("\n")
                );
                let _ = out.flush();
            }
            None => {}
        }
        if stopping {
            break;
        }
        // Sleep in short steps, so that a stop is seen at once.
        let until = Instant::now() + REFRESH;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if let Some(bar) = bar {
        bar.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = include_str!("../../tests/data/summary/metrics.txt");

    #[test]
    fn a_scrape_gives_failing_and_pending_twins_by_rule_and_the_alert_counters() {
        let sample = Sample::parse(METRICS);
        assert_eq!(
            sample.failing.get("device.security-module-present"),
            Some(&("high".to_owned(), 412))
        );
        assert_eq!(
            sample.failing.get("micro-agent.baseline-enabled"),
            Some(&("medium".to_owned(), 0))
        );
        assert_eq!(
            sample.failing.get("odd \"rule\", with\\escapes"),
            Some(&("low".to_owned(), 3))
        );
        assert_eq!(
            sample.pending.get("device.security-module-present"),
            Some(&37)
        );
        assert_eq!(
            sample.pending.get("asc-agent.configuration-applied"),
            Some(&120)
        );
        assert_eq!((sample.opened, sample.resolved), (1500, 1210));
        assert_eq!(sample.messages, 53_211 + 17 + 4);
        assert_eq!(Sample::parse("garbage\n{}\nx{ 1\n"), Sample::default());
    }

    #[test]
    fn the_window_counts_the_alerts_of_the_last_minute_only() {
        let start = Instant::now();
        let mut window = Window::default();
        let at = |opened, resolved| Sample {
            opened,
            resolved,
            ..Sample::default()
        };
        assert_eq!(window.push(start, &at(10, 2)), (0, 0));
        assert_eq!(
            window.push(start + Duration::from_secs(30), &at(25, 5)),
            (15, 3)
        );
        assert_eq!(
            window.push(start + Duration::from_secs(60), &at(40, 9)),
            (30, 7)
        );
        // The first sample is now more than a minute old.
        assert_eq!(
            window.push(start + Duration::from_secs(61), &at(41, 9)),
            (16, 4)
        );
    }

    #[test]
    fn the_summary_lists_rules_by_failing_twins_and_says_where_every_alert_goes() {
        let sample = Sample::parse(METRICS);
        let lines = render(&sample, (131, 40), Some("alerts.jsonl"));
        let expected = include_str!("../../tests/data/summary/summary.txt");
        assert_eq!(lines.join("\n") + "\n", expected);
        let none = render(&Sample::default(), (0, 0), None);
        assert!(none.contains(&"(no twin fails any rule yet)".to_owned()));
        assert_eq!(
            none.last().map(String::as_str),
            Some("every alert: rerun with --alerts-file FILE")
        );
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
    }
}
