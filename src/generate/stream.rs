//! The stream: the fleet's operations in time, the follow-up work they schedule, and the
//! notification envelopes. Twin changes are in `changes.rs`, noise in `noise.rs`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::body::full_twin_body;
use super::fleet::{
    default_effective, pick_weighted, random_device_tags, random_module_tags, Device,
    DeviceReported, DeviceTags, MicroAgentTwin, ModuleSlot, ModuleTags, SecurityAgentTwin,
    TwinCore, TwinSlot, DEVICE_PREFIXES,
};
use super::json::format_time;
use super::settings::INSTALLABLE_FIRMWARE_COUNT;
use super::{GenerateOptions, GeneratedBody, GeneratedMessage, MessageKind};
use crate::time::Ticks;

/// The first operation time: 2026-01-01T00:00:00Z.
pub(super) const START_UNIX_MILLIS: i64 = 1_767_225_600_000;
/// 100 ns ticks in a millisecond.
const TICKS_PER_MILLISECOND: u64 = 10_000;
/// Gaps between consecutive operations, in ticks. The smallest gap is longer than the longest
/// enqueue delay, so enqueued times increase through the stream too.
const MIN_GAP: u64 = 5 * TICKS_PER_MILLISECOND;
const MAX_GAP: u64 = 1000 * TICKS_PER_MILLISECOND;
const MIN_ENQUEUE_DELAY: u64 = TICKS_PER_MILLISECOND / 2;
const MAX_ENQUEUE_DELAY: u64 = 4 * TICKS_PER_MILLISECOND + TICKS_PER_MILLISECOND / 2;

/// `ticks` moved on by `by` ticks (drawn as unsigned, as the stream always has).
fn later(ticks: Ticks, by: u64) -> Ticks {
    Ticks(
        ticks
            .0
            .saturating_add(i64::try_from(by).unwrap_or(i64::MAX)),
    )
}

/// Follow-up work that a fleet operation schedules: the agent answering a desired patch, the
/// modules of a new device, a re-creation after a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Task {
    CreateModule(ModuleSlot),
    InitialConfiguration(ModuleSlot),
    AgentReport(ModuleSlot),
    DeviceReport,
    DeleteModule(ModuleSlot),
    DeleteDevice,
    RecreateDevice,
}

/// A task due at a fleet step; ordered by due step, then by scheduling order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Pending {
    pub(super) due: u64,
    pub(super) sequence: u64,
    pub(super) device: usize,
    pub(super) incarnation: u32,
    pub(super) task: Task,
}

#[derive(Debug, Clone, Copy)]
enum DeviceAction {
    AgentReport,
    ModuleDesiredPatch,
    DeviceReport,
    DeviceDesiredPatch,
    DeviceTags,
    ModuleTags,
    DeviceTagsAndDesired,
    ReplaceDeviceTags,
    ReplaceDesired,
    DeleteModule,
    AddModule,
    DeleteDevice,
}

/// How often each operation happens to a live device, relatively.
const DEVICE_ACTIONS: [(DeviceAction, u32); 12] = [
    (DeviceAction::AgentReport, 240),
    (DeviceAction::ModuleDesiredPatch, 160),
    (DeviceAction::DeviceReport, 120),
    (DeviceAction::DeviceDesiredPatch, 40),
    (DeviceAction::DeviceTags, 80),
    (DeviceAction::ModuleTags, 20),
    (DeviceAction::DeviceTagsAndDesired, 15),
    (DeviceAction::ReplaceDeviceTags, 15),
    (DeviceAction::ReplaceDesired, 20),
    (DeviceAction::DeleteModule, 10),
    (DeviceAction::AddModule, 6),
    (DeviceAction::DeleteDevice, 3),
];

/// Fleet messages kept for duplicates and stale re-sends.
const RECENT_CAPACITY: usize = 512;
/// Share of steps that onboard a new device while some are still to come.
const ONBOARD_PERCENT: u32 = 45;

/// A fleet message kept for noise, and whether it is an `updateTwin`.
pub(super) struct RecentMessage {
    pub(super) message: GeneratedMessage,
    pub(super) is_update: bool,
}

/// The message stream of a fleet (see the module docs). Built by [`messages`].
pub struct Messages {
    pub(super) rng: ChaCha8Rng,
    pub(super) hub: String,
    pub(super) device_count: u64,
    pub(super) remaining: u64,
    pub(super) noise: f64,
    /// The operation time of the last message.
    pub(super) clock: Ticks,
    /// Devices onboarded so far, by index.
    pub(super) fleet: Vec<Device>,
    /// Fleet messages generated so far: the time base of scheduled tasks.
    pub(super) fleet_step: u64,
    pub(super) pending: BinaryHeap<Reverse<Pending>>,
    pub(super) pending_sequence: u64,
    pub(super) recent: VecDeque<RecentMessage>,
    /// Position in the first round through every noise kind.
    pub(super) noise_cycle: usize,
    pub(super) connection_sequence: u64,
}

impl Iterator for Messages {
    type Item = GeneratedMessage;

    fn next(&mut self) -> Option<GeneratedMessage> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let noise = self.noise > 0.0 && self.rng.gen::<f64>() < self.noise;
        if noise || self.device_count == 0 {
            return Some(self.noise_message());
        }
        let message = self.fleet_message();
        if self.noise > 0.0 && self.rng.gen_ratio(1, 4) {
            // Keeping a sample is enough for noise, and saves cloning every message.
            if self.recent.len() == RECENT_CAPACITY {
                self.recent.pop_front();
            }
            let is_update = message
                .properties
                .iter()
                .any(|(key, value)| key == "opType" && value == "updateTwin");
            self.recent.push_back(RecentMessage {
                message: message.clone(),
                is_update,
            });
        }
        Some(message)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let remaining = usize::try_from(self.remaining).unwrap_or(usize::MAX);
        (remaining, usize::try_from(self.remaining).ok())
    }
}

/// Where a notification comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    TwinChange,
    Lifecycle,
}

impl Source {
    pub(super) fn schema(self) -> &'static str {
        match self {
            Source::TwinChange => "twinChangeNotification",
            Source::Lifecycle => "deviceLifecycleNotification",
        }
    }

    pub(super) fn message_source(self) -> &'static str {
        match self {
            Source::TwinChange => "twinChangeEvents",
            Source::Lifecycle => "deviceLifecycleEvents",
        }
    }
}

pub(super) fn pair(key: &str, value: impl Into<String>) -> (String, String) {
    (key.to_owned(), value.into())
}

pub(super) fn set_property(properties: &mut Vec<(String, String)>, key: &str, value: String) {
    match properties.iter_mut().find(|(name, _)| name == key) {
        Some(entry) => entry.1 = value,
        None => properties.push((key.to_owned(), value)),
    }
}

pub(super) fn remove_property(properties: &mut Vec<(String, String)>, key: &str) {
    properties.retain(|(name, _)| name != key);
}

impl Messages {
    /// The stream for `opts` (see [`super::messages`]).
    pub(super) fn new(opts: &GenerateOptions) -> Messages {
        // NaN fails both comparisons and ends up as 0: no noise.
        let noise = if opts.noise >= 1.0 {
            1.0
        } else if opts.noise > 0.0 {
            opts.noise
        } else {
            0.0
        };
        Messages {
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
            hub: opts.hub.clone(),
            device_count: opts.devices,
            remaining: opts.events,
            noise,
            clock: Ticks::from_unix_millis(START_UNIX_MILLIS),
            fleet: Vec::new(),
            fleet_step: 0,
            pending: BinaryHeap::new(),
            pending_sequence: 0,
            recent: VecDeque::with_capacity(RECENT_CAPACITY),
            noise_cycle: 0,
            connection_sequence: 0,
        }
    }

    // ----- time and envelopes -----

    /// The next operation time and its enqueued time.
    pub(super) fn next_times(&mut self) -> (Ticks, Ticks) {
        let gap = self.rng.gen_range(MIN_GAP..=MAX_GAP);
        self.clock = later(self.clock, gap);
        let delay = self.rng.gen_range(MIN_ENQUEUE_DELAY..=MAX_ENQUEUE_DELAY);
        (self.clock, later(self.clock, delay))
    }

    pub(super) fn correlation_id(&mut self) -> String {
        format!("{:011x}", self.rng.gen::<u64>() >> 20)
    }

    pub(super) fn device_id(&self, device: usize) -> String {
        let prefix = self
            .fleet
            .get(device)
            .map_or(0, |device| usize::from(device.prefix));
        format!(
            "{}-{device:06}",
            DEVICE_PREFIXES[prefix % DEVICE_PREFIXES.len()]
        )
    }

    /// The properties of a twin-change or lifecycle notification.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn notification(
        &mut self,
        device_id: &str,
        module_id: Option<&str>,
        source: Source,
        op_type: &str,
        op_time: Ticks,
        enqueued: Ticks,
        body: GeneratedBody,
        kind: MessageKind,
    ) -> GeneratedMessage {
        let enqueued_text = format_time(enqueued);
        let mut properties = Vec::with_capacity(6);
        properties.push(pair("hubName", self.hub.as_str()));
        properties.push(pair("deviceId", device_id));
        if let Some(module_id) = module_id {
            properties.push(pair("moduleId", module_id));
        }
        properties.push(pair("operationTimestamp", format_time(op_time)));
        properties.push(pair("iothub-message-schema", source.schema()));
        properties.push(pair("opType", op_type));
        let mut system_properties = Vec::with_capacity(7);
        system_properties.push(pair("correlationId", self.correlation_id()));
        system_properties.push(pair("connectionDeviceId", device_id));
        if let Some(module_id) = module_id {
            system_properties.push(pair("connectionModuleId", module_id));
        }
        system_properties.push(pair("enqueuedTime", enqueued_text.as_str()));
        system_properties.push(pair("contentType", "application/json"));
        system_properties.push(pair("contentEncoding", "utf-8"));
        system_properties.push(pair("iothub-message-source", source.message_source()));
        GeneratedMessage {
            enqueued_time_utc: enqueued_text,
            properties,
            system_properties,
            body,
            kind,
        }
    }

    /// A fleet notification about twin `slot` of device `device`.
    pub(super) fn fleet_notification(
        &mut self,
        device: usize,
        slot: TwinSlot,
        source: Source,
        op_type: &str,
        times: (Ticks, Ticks),
        body: Vec<u8>,
    ) -> GeneratedMessage {
        let device_id = self.device_id(device);
        let module_id = match slot {
            TwinSlot::Device => None,
            TwinSlot::Module(module) => Some(module.module_id()),
        };
        let kind = match source {
            Source::TwinChange => MessageKind::TwinChange,
            Source::Lifecycle => MessageKind::Lifecycle,
        };
        self.notification(
            &device_id,
            module_id,
            source,
            op_type,
            times.0,
            times.1,
            GeneratedBody::Json(body),
            kind,
        )
    }

    pub(super) fn schedule(&mut self, device: usize, delay: u64, task: Task) {
        let incarnation = self
            .fleet
            .get(device)
            .map_or(0, |device| device.incarnation);
        self.pending_sequence += 1;
        self.pending.push(Reverse(Pending {
            due: self.fleet_step.saturating_add(delay),
            sequence: self.pending_sequence,
            device,
            incarnation,
            task,
        }));
    }

    // ----- the fleet -----

    /// The next fleet message. Only called when the fleet has at least one device, so that
    /// a random operation can always be found.
    fn fleet_message(&mut self) -> GeneratedMessage {
        let message = match self.run_due_task() {
            Some(message) => message,
            None => self.random_operation(),
        };
        self.fleet_step += 1;
        message
    }

    fn run_due_task(&mut self) -> Option<GeneratedMessage> {
        while let Some(Reverse(pending)) = self.pending.peek().copied() {
            if pending.due > self.fleet_step {
                return None;
            }
            self.pending.pop();
            if let Some(message) = self.run_task(pending) {
                return Some(message);
            }
        }
        None
    }

    /// Runs a scheduled task if it still makes sense: the device may have been deleted or
    /// re-created, a module deleted or created, since it was scheduled.
    fn run_task(&mut self, pending: Pending) -> Option<GeneratedMessage> {
        let device = self.fleet.get(pending.device)?;
        if pending.incarnation != device.incarnation {
            return None;
        }
        let device_live = device.core.live;
        let module_live = [
            device.module_live(ModuleSlot::SecurityAgent),
            device.module_live(ModuleSlot::MicroAgent),
        ];
        let is_live = |module: ModuleSlot| match module {
            ModuleSlot::SecurityAgent => module_live[0],
            ModuleSlot::MicroAgent => module_live[1],
        };
        let d = pending.device;
        if let Task::RecreateDevice = pending.task {
            return (!device_live).then(|| self.create_device(d));
        }
        if !device_live {
            return None;
        }
        match pending.task {
            Task::CreateModule(module) => (!is_live(module)).then(|| self.create_module(d, module)),
            Task::InitialConfiguration(module) => {
                is_live(module).then(|| self.desired_patch(d, TwinSlot::Module(module), true))
            }
            Task::AgentReport(module) => is_live(module).then(|| self.agent_report(d, module)),
            Task::DeleteModule(module) => is_live(module).then(|| self.delete_module(d, module)),
            Task::DeviceReport => Some(self.device_report(d, true)),
            Task::DeleteDevice => Some(self.delete_device(d)),
            // Handled above, before the device had to be live.
            Task::RecreateDevice => None,
        }
    }

    fn random_operation(&mut self) -> GeneratedMessage {
        let onboarded = self.fleet.len() as u64;
        if onboarded < self.device_count
            && (onboarded == 0 || self.rng.gen_ratio(ONBOARD_PERCENT, 100))
        {
            return self.onboard_device();
        }
        // Retired devices are skipped a few times, then brought back rather than searched
        // for forever: a fleet whose devices are all retired must still produce messages.
        let mut attempts = 0;
        loop {
            let d = self.rng.gen_range(0..self.fleet.len());
            let device = &self.fleet[d];
            if device.core.live {
                return self.operate_on_device(d);
            }
            attempts += 1;
            if !device.retired || attempts >= 8 {
                return self.create_device(d);
            }
        }
    }

    fn onboard_device(&mut self) -> GeneratedMessage {
        let rng = &mut self.rng;
        let prefix = pick_weighted(rng, &[30, 30, 15, 15, 10]) as u8;
        let (plans_security_agent, plans_micro_agent) = match pick_weighted(rng, &[30, 55, 5, 10]) {
            0 => (true, false),
            1 => (false, true),
            2 => (true, true),
            _ => (false, false),
        };
        let firmware = rng.gen_range(0..INSTALLABLE_FIRMWARE_COUNT);
        self.fleet.push(Device {
            prefix,
            incarnation: 0,
            retired: false,
            plans_security_agent,
            plans_micro_agent,
            core: TwinCore::default(),
            tags: DeviceTags::default(),
            reported: DeviceReported {
                firmware,
                ..DeviceReported::default()
            },
            security_agent: SecurityAgentTwin {
                core: TwinCore::default(),
                tags: ModuleTags::default(),
                legacy_object: false,
                has_reported: false,
                effective: default_effective(),
            },
            micro_agent: MicroAgentTwin::default(),
        });
        self.create_device(self.fleet.len() - 1)
    }

    /// Creates (or re-creates) device `d` and schedules its modules and first report.
    fn create_device(&mut self, d: usize) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        if device.core.live {
            // Not reached: callers only create devices that do not exist. Kept total anyway.
            return self.device_report(d, false);
        }
        let recreated = device.core.version > 0;
        if recreated {
            device.incarnation = device.incarnation.wrapping_add(1);
        }
        let old_tags = device.tags;
        device.retired = false;
        device.core = TwinCore::created();
        device.tags = random_device_tags(rng);
        if recreated && rng.gen_ratio(8, 10) {
            // A re-registered device usually goes back where it was.
            device.tags.environment = old_tags.environment;
            device.tags.site = old_tags.site;
        }
        device.reported = DeviceReported {
            firmware: device.reported.firmware,
            ..DeviceReported::default()
        };
        device.security_agent.core.live = false;
        device.micro_agent.core.live = false;
        let plans = [
            (ModuleSlot::SecurityAgent, device.plans_security_agent),
            (ModuleSlot::MicroAgent, device.plans_micro_agent),
        ];
        let body = full_twin_body(device, &device_id, TwinSlot::Device, true);
        for (module, planned) in plans {
            if planned {
                let delay = self.rng.gen_range(1..=6);
                self.schedule(d, delay, Task::CreateModule(module));
            }
        }
        let delay = self.rng.gen_range(2..=30);
        self.schedule(d, delay, Task::DeviceReport);
        self.fleet_notification(
            d,
            TwinSlot::Device,
            Source::Lifecycle,
            "createDeviceIdentity",
            times,
            body,
        )
    }

    fn create_module(&mut self, d: usize, module: ModuleSlot) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let tags = random_module_tags(rng, device.tags.environment);
        match module {
            ModuleSlot::SecurityAgent => {
                device.security_agent = SecurityAgentTwin {
                    core: TwinCore::created(),
                    tags,
                    legacy_object: rng.gen_ratio(1, 25),
                    has_reported: false,
                    effective: default_effective(),
                };
            }
            ModuleSlot::MicroAgent => {
                device.micro_agent = MicroAgentTwin {
                    core: TwinCore::created(),
                    tags,
                    ..MicroAgentTwin::default()
                };
            }
        }
        let body = full_twin_body(device, &device_id, TwinSlot::Module(module), true);
        // Most fleets push a configuration to new agents (an IoT Hub configuration or a
        // script); the agent comes online and reports whatever it runs with.
        if self.rng.gen_ratio(3, 4) {
            let delay = self.rng.gen_range(1..=15);
            self.schedule(d, delay, Task::InitialConfiguration(module));
        }
        if self.rng.gen_ratio(9, 10) {
            let delay = self.rng.gen_range(2..=40);
            self.schedule(d, delay, Task::AgentReport(module));
        }
        self.fleet_notification(
            d,
            TwinSlot::Module(module),
            Source::Lifecycle,
            "createDeviceIdentity",
            times,
            body,
        )
    }

    fn operate_on_device(&mut self, d: usize) -> GeneratedMessage {
        let weights = DEVICE_ACTIONS.map(|(_, weight)| weight);
        let action = DEVICE_ACTIONS[pick_weighted(&mut self.rng, &weights)].0;
        let live_module = self.pick_live_module(d);
        match (action, live_module) {
            (DeviceAction::AgentReport, Some(module)) => self.agent_report(d, module),
            (DeviceAction::ModuleDesiredPatch, Some(module)) => {
                self.desired_patch(d, TwinSlot::Module(module), false)
            }
            (DeviceAction::DeviceDesiredPatch, _) => self.desired_patch(d, TwinSlot::Device, false),
            (DeviceAction::DeviceTags, _) => self.device_tags_patch(d, false),
            (DeviceAction::DeviceTagsAndDesired, _) => self.device_tags_patch(d, true),
            (DeviceAction::ModuleTags, Some(module)) => self.module_tags_patch(d, module),
            (DeviceAction::ReplaceDeviceTags, _) => self.replace_device_tags(d),
            (DeviceAction::ReplaceDesired, Some(module)) => {
                self.replace_desired(d, TwinSlot::Module(module))
            }
            (DeviceAction::ReplaceDesired, None) => self.replace_desired(d, TwinSlot::Device),
            (DeviceAction::DeleteModule, Some(module)) => {
                let message = self.delete_module(d, module);
                let device = &mut self.fleet[d];
                if self.rng.gen_ratio(1, 2) {
                    // Taken off for good (an agent migration, say): it is not re-created.
                    match module {
                        ModuleSlot::SecurityAgent => device.plans_security_agent = false,
                        ModuleSlot::MicroAgent => device.plans_micro_agent = false,
                    }
                } else {
                    let delay = self.rng.gen_range(5..=300);
                    self.schedule(d, delay, Task::CreateModule(module));
                }
                message
            }
            (DeviceAction::AddModule, _) => {
                let device = &self.fleet[d];
                let missing = if !device.module_live(ModuleSlot::MicroAgent) {
                    Some(ModuleSlot::MicroAgent)
                } else if !device.module_live(ModuleSlot::SecurityAgent) {
                    Some(ModuleSlot::SecurityAgent)
                } else {
                    None
                };
                match missing {
                    Some(module) => {
                        let device = &mut self.fleet[d];
                        match module {
                            ModuleSlot::SecurityAgent => device.plans_security_agent = true,
                            ModuleSlot::MicroAgent => device.plans_micro_agent = true,
                        }
                        self.create_module(d, module)
                    }
                    None => self.device_tags_patch(d, false),
                }
            }
            (DeviceAction::DeleteDevice, _) => self.begin_device_delete(d),
            // Module operations on a device without modules: it reports instead.
            (DeviceAction::DeviceReport, _)
            | (DeviceAction::AgentReport, None)
            | (DeviceAction::ModuleDesiredPatch, None)
            | (DeviceAction::ModuleTags, None)
            | (DeviceAction::DeleteModule, None) => self.device_report(d, false),
        }
    }

    fn pick_live_module(&mut self, d: usize) -> Option<ModuleSlot> {
        let device = &self.fleet[d];
        match (
            device.module_live(ModuleSlot::SecurityAgent),
            device.module_live(ModuleSlot::MicroAgent),
        ) {
            (true, true) => Some(if self.rng.gen_ratio(1, 2) {
                ModuleSlot::SecurityAgent
            } else {
                ModuleSlot::MicroAgent
            }),
            (true, false) => Some(ModuleSlot::SecurityAgent),
            (false, true) => Some(ModuleSlot::MicroAgent),
            (false, false) => None,
        }
    }
    fn delete_module(&mut self, d: usize, module: ModuleSlot) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let device = &self.fleet[d];
        let slot = TwinSlot::Module(module);
        // The body is the twin as it was.
        let body = full_twin_body(device, &device_id, slot, true);
        self.fleet[d].core_mut(slot).live = false;
        self.fleet_notification(
            d,
            slot,
            Source::Lifecycle,
            "deleteDeviceIdentity",
            times,
            body,
        )
    }

    /// Deletes device `d`: sometimes its modules explicitly first (whether IoT Hub sends
    /// those is not known; the consumer removes them with the device either way).
    fn begin_device_delete(&mut self, d: usize) -> GeneratedMessage {
        let device = &self.fleet[d];
        let live_modules: Vec<ModuleSlot> = [ModuleSlot::SecurityAgent, ModuleSlot::MicroAgent]
            .into_iter()
            .filter(|&module| device.module_live(module))
            .collect();
        if live_modules.is_empty() || self.rng.gen_ratio(1, 2) {
            return self.delete_device(d);
        }
        for &module in &live_modules[1..] {
            self.schedule(d, 0, Task::DeleteModule(module));
        }
        self.schedule(d, 0, Task::DeleteDevice);
        self.delete_module(d, live_modules[0])
    }

    fn delete_device(&mut self, d: usize) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let device = &self.fleet[d];
        let body = full_twin_body(device, &device_id, TwinSlot::Device, true);
        let device = &mut self.fleet[d];
        device.core.live = false;
        device.security_agent.core.live = false;
        device.micro_agent.core.live = false;
        if self.rng.gen_ratio(8, 10) {
            let delay = self.rng.gen_range(20..=2000);
            self.schedule(d, delay, Task::RecreateDevice);
        } else {
            self.fleet[d].retired = true;
        }
        self.fleet_notification(
            d,
            TwinSlot::Device,
            Source::Lifecycle,
            "deleteDeviceIdentity",
            times,
            body,
        )
    }
}
