//! The agent settings catalogue: every desired key of the device twin, the security agent
//! (`azureiotsecurity`) and the micro agent (`DefenderIotMicroAgent`), the values the back end
//! picks from, and how an agent takes each one (applies it, flags it, rejects it, rewrites it).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SettingValue {
    Text(&'static str),
    Integer(i64),
    Boolean(bool),
}

/// How an agent takes a desired value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Valid and what a sensible policy wants.
    Recommended,
    /// Valid, so the agent applies it, but a policy should flag it (not a multiple of 4 KiB,
    /// a cache smaller than a message, a disabled collector, ...).
    NonCompliant,
    /// Invalid for the agent (wrong type, out of range, bad duration, unknown enum value): it
    /// keeps its current value, so reported differs from desired.
    Rejected,
    /// Valid but written back in canonical form: the candidate at this index.
    Rewritten(u8),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Candidate {
    pub(super) value: SettingValue,
    pub(super) verdict: Verdict,
}

pub(super) const fn candidate(value: SettingValue, verdict: Verdict) -> Candidate {
    Candidate { value, verdict }
}

/// One desired setting: its key and the values the back end picks from.
pub(super) struct Setting {
    pub(super) name: &'static str,
    /// Index of the agent's default in `candidates`.
    pub(super) default: u8,
    pub(super) candidates: &'static [Candidate],
}

pub(super) const fn setting(
    name: &'static str,
    default: u8,
    candidates: &'static [Candidate],
) -> Setting {
    Setting {
        name,
        default,
        candidates,
    }
}

use SettingValue::{Boolean, Integer, Text};
use Verdict::{NonCompliant, Recommended, Rejected, Rewritten};

const HIGH_PRIORITY_FREQUENCY: &[Candidate] = &[
    candidate(Text("PT7M"), Recommended),
    candidate(Text("PT5M"), Recommended),
    candidate(Text("PT10M"), Recommended),
    candidate(Text("PT15M"), Recommended),
    // Longer than the default low-priority interval: a conflict.
    candidate(Text("PT6H"), NonCompliant),
    candidate(Text("PT420S"), Rewritten(0)),
    // Valid ISO 8601, but beyond the C agent's 49.7-day limit.
    candidate(Text("P60D"), Rejected),
    candidate(Text("7 minutes"), Rejected),
    candidate(Text("PT"), Rejected),
    candidate(Integer(420), Rejected),
];

const LOW_PRIORITY_FREQUENCY: &[Candidate] = &[
    candidate(Text("PT5H"), Recommended),
    candidate(Text("PT2H"), Recommended),
    candidate(Text("PT12H"), Recommended),
    candidate(Text("PT1H"), Recommended),
    // Shorter than the default high-priority interval: a conflict.
    candidate(Text("PT5M"), NonCompliant),
    candidate(Text("PT300M"), Rewritten(0)),
    candidate(Text("5 hours"), Rejected),
    candidate(Text("PT-5H"), Rejected),
    candidate(Integer(18_000), Rejected),
];

const SNAPSHOT_FREQUENCY: &[Candidate] = &[
    candidate(Text("PT13H"), Recommended),
    candidate(Text("PT6H"), Recommended),
    candidate(Text("P1D"), Recommended),
    candidate(Text("PT1M"), NonCompliant),
    candidate(Text("P90D"), Rejected),
    candidate(Text("13h"), Rejected),
    candidate(Text(""), Rejected),
];

const LOCAL_CACHE_SIZE: &[Candidate] = &[
    candidate(Integer(2_560_000), Recommended),
    candidate(Integer(5_120_000), Recommended),
    candidate(Integer(10_485_760), Recommended),
    candidate(Integer(1_048_576), Recommended),
    // Smaller than the default message size: a conflict.
    candidate(Integer(65_536), NonCompliant),
    candidate(Integer(131_072), NonCompliant),
    // Below the schema's minimum of 8192.
    candidate(Integer(4096), Rejected),
    candidate(Text("2560000"), Rejected),
    candidate(Integer(-1), Rejected),
];

const MESSAGE_SIZE: &[Candidate] = &[
    candidate(Integer(204_800), Recommended),
    candidate(Integer(262_144), Recommended),
    candidate(Integer(131_072), Recommended),
    candidate(Integer(65_536), Recommended),
    // Not multiples of 4096: the agent applies them but calls them not optimal.
    candidate(Integer(200_000), NonCompliant),
    candidate(Integer(100_000), NonCompliant),
    candidate(Integer(250_000), NonCompliant),
    // Outside 8192 ..= 262144.
    candidate(Integer(300_000), Rejected),
    candidate(Integer(4096), Rejected),
    candidate(Text("204800"), Rejected),
];

const EVENT_PRIORITY: &[Candidate] = &[
    candidate(Text("High"), Recommended),
    candidate(Text("Low"), Recommended),
    candidate(Text("Off"), NonCompliant),
    // The C agent compares priorities case-insensitively.
    candidate(Text("high"), Rewritten(0)),
    candidate(Text("low"), Rewritten(1)),
    candidate(Text("Medium"), Rejected),
    candidate(Text("Critical"), Rejected),
    candidate(Integer(1), Rejected),
    candidate(Text(""), Rejected),
];
const PRIORITY_HIGH: u8 = 0;
const PRIORITY_LOW: u8 = 1;

const AGGREGATION_ENABLED: &[Candidate] = &[
    candidate(Boolean(true), Recommended),
    candidate(Boolean(false), NonCompliant),
    candidate(Text("yes"), Rejected),
    candidate(Integer(1), Rejected),
];

const AGGREGATION_INTERVAL: &[Candidate] = &[
    candidate(Text("PT1H"), Recommended),
    candidate(Text("PT30M"), Recommended),
    candidate(Text("PT2H"), Recommended),
    candidate(Text("PT5S"), NonCompliant),
    candidate(Text("1 hour"), Rejected),
    candidate(Text("P"), Rejected),
];

/// The `azureiotsecurity` agent's configuration keys, in the order agents report them.
pub(super) const SECURITY_AGENT_SETTINGS: &[Setting] = &[
    setting("highPriorityMessageFrequency", 0, HIGH_PRIORITY_FREQUENCY),
    setting("lowPriorityMessageFrequency", 0, LOW_PRIORITY_FREQUENCY),
    setting("snapshotFrequency", 0, SNAPSHOT_FREQUENCY),
    setting("maxLocalCacheSizeInBytes", 0, LOCAL_CACHE_SIZE),
    setting("maxMessageSizeInBytes", 0, MESSAGE_SIZE),
    // The schema and the agents' code default Diagnostic to Low; the docs say Off.
    setting("eventPriorityDiagnostic", PRIORITY_LOW, EVENT_PRIORITY),
    setting(
        "eventPriorityConfigurationError",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting(
        "eventPriorityDroppedEventsStatistics",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting(
        "eventPriorityMessageStatistics",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting(
        "eventPriorityConnectedHardware",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting("eventPriorityListeningPorts", PRIORITY_HIGH, EVENT_PRIORITY),
    setting("eventPriorityProcessCreate", PRIORITY_LOW, EVENT_PRIORITY),
    setting(
        "eventPriorityProcessTerminate",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting(
        "eventPrioritySystemInformation",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting("eventPriorityLocalUsers", PRIORITY_HIGH, EVENT_PRIORITY),
    setting("eventPriorityLogin", PRIORITY_HIGH, EVENT_PRIORITY),
    setting(
        "eventPriorityConnectionCreate",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting(
        "eventPriorityFirewallConfiguration",
        PRIORITY_LOW,
        EVENT_PRIORITY,
    ),
    setting("eventPriorityOSBaseline", PRIORITY_LOW, EVENT_PRIORITY),
    setting("aggregationEnabledProcessCreate", 0, AGGREGATION_ENABLED),
    setting("aggregationIntervalProcessCreate", 0, AGGREGATION_INTERVAL),
    setting("aggregationEnabledConnectionCreate", 0, AGGREGATION_ENABLED),
    setting(
        "aggregationIntervalConnectionCreate",
        0,
        AGGREGATION_INTERVAL,
    ),
    setting("aggregationEnabledProcessTerminate", 0, AGGREGATION_ENABLED),
    setting(
        "aggregationIntervalProcessTerminate",
        0,
        AGGREGATION_INTERVAL,
    ),
];
pub(super) const SECURITY_AGENT_SETTING_COUNT: usize = SECURITY_AGENT_SETTINGS.len();

const PRIORITY_INTERVALS: &[Candidate] = &[
    candidate(Text("30,120,1440"), Recommended),
    candidate(Text("60,120,480"), Recommended),
    candidate(Text("15,60,240"), Recommended),
    candidate(Text("30,60,120"), Recommended),
    // High longer than low: accepted, but backwards.
    candidate(Text("1440,120,30"), NonCompliant),
    // Malformed: all three are required, comma-separated minutes.
    candidate(Text("30,120"), Rejected),
    candidate(Text("30;120;1440"), Rejected),
    candidate(Text("fast"), Rejected),
    candidate(Integer(30), Rejected),
];

const COLLECTOR_DISABLED: &[Candidate] = &[
    candidate(Boolean(false), Recommended),
    candidate(Boolean(true), NonCompliant),
    candidate(Text("no"), Rejected),
    candidate(Text("false"), Rejected),
];

const MESSAGE_FREQUENCY: &[Candidate] = &[
    candidate(Text("Low"), Recommended),
    candidate(Text("Medium"), Recommended),
    candidate(Text("High"), Recommended),
    candidate(Text("Hourly"), Rejected),
    candidate(Integer(2), Rejected),
];
const FREQUENCY_LOW: u8 = 0;
const FREQUENCY_MEDIUM: u8 = 1;

const BASELINE_GROUPS_DISABLED: &[Candidate] = &[
    candidate(Text(""), Recommended),
    candidate(
        Text("Time Synchronization, Network Parameters Host"),
        NonCompliant,
    ),
    candidate(Integer(5), Rejected),
];

const BASELINE_CHECKS_DISABLED: &[Candidate] = &[
    candidate(Text(""), Recommended),
    candidate(Text("3.3.5,2.2.1.1"), NonCompliant),
    candidate(Boolean(true), Rejected),
];

const USE_PAM: &[Candidate] = &[
    candidate(Boolean(false), Recommended),
    candidate(Boolean(true), Recommended),
    candidate(Text("pam"), Rejected),
];

const MESSAGE_TIMEOUT_MINUTES: &[Candidate] = &[
    candidate(Integer(2880), Recommended),
    candidate(Integer(1440), Recommended),
    candidate(Integer(4320), Recommended),
    candidate(Integer(60), NonCompliant),
    candidate(Integer(0), Rejected),
    candidate(Integer(-5), Rejected),
    candidate(Text("2d"), Rejected),
];

const NETWORK_DEVICES: &[Candidate] = &[
    candidate(Text("eth0"), Recommended),
    candidate(Text("eth0,wlan0"), Recommended),
    candidate(Text("wlan0"), Recommended),
    candidate(Text(""), NonCompliant),
];

const CACHE_SIZE: &[Candidate] = &[
    candidate(Integer(256), Recommended),
    candidate(Integer(512), Recommended),
    candidate(Integer(1024), Recommended),
    candidate(Integer(16), NonCompliant),
    candidate(Integer(0), Rejected),
    candidate(Integer(-1), Rejected),
];

const PROCESS_MODE: &[Candidate] = &[
    candidate(Integer(1), Recommended),
    candidate(Integer(2), Recommended),
    candidate(Integer(3), Recommended),
    candidate(Integer(7), Rejected),
    candidate(Text("auto"), Rejected),
];

const POLLING_INTERVAL_MICROSECONDS: &[Candidate] = &[
    candidate(Integer(100_000), Recommended),
    candidate(Integer(50_000), Recommended),
    candidate(Integer(500_000), Recommended),
    candidate(Integer(0), Rejected),
];

/// The `DefenderIotMicroAgent` desired keys.
pub(super) const MICRO_AGENT_SETTINGS: &[Setting] = &[
    setting("CollectorsCore_PriorityIntervals", 0, PRIORITY_INTERVALS),
    setting("Baseline_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "Baseline_MessageFrequency",
        FREQUENCY_LOW,
        MESSAGE_FREQUENCY,
    ),
    setting("Baseline_GroupsDisabled", 0, BASELINE_GROUPS_DISABLED),
    setting("Baseline_ChecksDisabled", 0, BASELINE_CHECKS_DISABLED),
    setting("SystemInformation_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "SystemInformation_MessageFrequency",
        FREQUENCY_LOW,
        MESSAGE_FREQUENCY,
    ),
    setting("SBoM_Disabled", 0, COLLECTOR_DISABLED),
    setting("SBoM_MessageFrequency", FREQUENCY_LOW, MESSAGE_FREQUENCY),
    setting("Heartbeat_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "Heartbeat_MessageFrequency",
        FREQUENCY_LOW,
        MESSAGE_FREQUENCY,
    ),
    setting("Login_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "Login_MessageFrequency",
        FREQUENCY_MEDIUM,
        MESSAGE_FREQUENCY,
    ),
    setting("Login_UsePAM", 0, USE_PAM),
    setting("IothubModule_MessageTimeout", 0, MESSAGE_TIMEOUT_MINUTES),
    setting("NetworkActivity_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "NetworkActivity_MessageFrequency",
        FREQUENCY_MEDIUM,
        MESSAGE_FREQUENCY,
    ),
    setting("NetworkActivity_Devices", 0, NETWORK_DEVICES),
    setting("NetworkActivity_CacheSize", 0, CACHE_SIZE),
    setting("Process_Disabled", 0, COLLECTOR_DISABLED),
    setting(
        "Process_MessageFrequency",
        FREQUENCY_MEDIUM,
        MESSAGE_FREQUENCY,
    ),
    setting("Process_Mode", 0, PROCESS_MODE),
    setting("Process_PollingInterval", 0, POLLING_INTERVAL_MICROSECONDS),
    setting("Process_CacheSize", 0, CACHE_SIZE),
    setting("FileSystem_Disabled", 0, COLLECTOR_DISABLED),
];
// The micro agent's invalid fields are kept as a bit set.
const _: () = assert!(MICRO_AGENT_SETTINGS.len() <= 32);

const TELEMETRY_INTERVAL_SECONDS: &[Candidate] = &[
    candidate(Integer(60), Recommended),
    candidate(Integer(30), Recommended),
    candidate(Integer(300), Recommended),
    candidate(Integer(900), Recommended),
    candidate(Integer(5), NonCompliant),
    candidate(Integer(0), Rejected),
    candidate(Text("60s"), Rejected),
];

const FIRMWARE_VERSION: &[Candidate] = &[
    candidate(Text("2.4.1"), Recommended),
    candidate(Text("2.5.0"), Recommended),
    candidate(Text("2.5.1"), Recommended),
    // An old, vulnerable release.
    candidate(Text("2.3.0"), NonCompliant),
    // A release that does not exist: the device keeps what it runs.
    candidate(Text("9.9.9"), Rejected),
];
/// Firmware the devices may run: every candidate before the rejected one.
pub(super) const INSTALLABLE_FIRMWARE_COUNT: u8 = 4;

const LOG_LEVEL: &[Candidate] = &[
    candidate(Text("info"), Recommended),
    candidate(Text("warning"), Recommended),
    candidate(Text("error"), Recommended),
    candidate(Text("debug"), NonCompliant),
    candidate(Text("verbose"), Rejected),
    candidate(Integer(3), Rejected),
];

/// A device twin's desired keys (flat), the same keys the device reports back.
pub(super) const DEVICE_SETTINGS: &[Setting] = &[
    setting("telemetryIntervalSeconds", 0, TELEMETRY_INTERVAL_SECONDS),
    setting("firmwareVersion", 0, FIRMWARE_VERSION),
    setting("logLevel", 0, LOG_LEVEL),
];
pub(super) const DEVICE_SETTING_TELEMETRY: u8 = 0;
pub(super) const DEVICE_SETTING_FIRMWARE: u8 = 1;
pub(super) const DEVICE_SETTING_LOG_LEVEL: u8 = 2;

/// The value an agent runs with after seeing desired `candidate` while running `current`.
pub(super) fn effective_candidate(candidates: &[Candidate], candidate: u8, current: u8) -> u8 {
    match candidates.get(usize::from(candidate)).map(|c| c.verdict) {
        Some(Recommended) | Some(NonCompliant) => candidate,
        Some(Rewritten(canonical)) => canonical,
        Some(Rejected) | None => current,
    }
}

pub(super) fn candidate_value(setting: &Setting, candidate: u8) -> SettingValue {
    setting
        .candidates
        .get(usize::from(candidate))
        .or_else(|| setting.candidates.first())
        .map_or(Boolean(false), |c| c.value)
}

pub(super) fn is_rejected(setting: &Setting, candidate: u8) -> bool {
    setting
        .candidates
        .get(usize::from(candidate))
        .is_some_and(|c| c.verdict == Rejected)
}

/// Picks a value for `setting`: a recommended one, or when `misconfigure` is set one that a
/// policy should flag or the agent should reject.
pub(super) fn pick_candidate(rng: &mut ChaCha8Rng, setting: &Setting, misconfigure: bool) -> u8 {
    let wanted = |c: &Candidate| (c.verdict == Recommended) != misconfigure;
    let pool = setting.candidates.iter().filter(|c| wanted(c)).count();
    if pool == 0 {
        return setting.default;
    }
    let chosen = rng.gen_range(0..pool);
    setting
        .candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| wanted(c))
        .nth(chosen)
        .map_or(setting.default, |(index, _)| index as u8)
}
