//! Twin changes: back-end desired patches, tag patches and replaces, and the agents' and
//! devices' reports, each applied to the fleet model and written as IoT Hub notifies it.

use rand::Rng;

use super::body::{
    building_name, full_twin_body, write_desired_patch, write_device_reported, write_location,
    write_reported_section, DesiredPatch,
};
use super::fleet::{
    pick_environment, random_device_tags, settings_of, DesiredSection, Layout, ModuleSlot,
    TwinSlot, ENVIRONMENTS, NETWORKS, OWNERS, REGIONS, REPORTED_ALL, REPORTED_CONNECTIVITY,
    REPORTED_FIRMWARE, REPORTED_LOG_LEVEL, REPORTED_TELEMETRY, RINGS, SITES, TIERS,
};
use super::json::{JsonWriter, NEVER};
use super::settings::{
    effective_candidate, is_rejected, pick_candidate, DEVICE_SETTINGS, DEVICE_SETTING_FIRMWARE,
    DEVICE_SETTING_LOG_LEVEL, DEVICE_SETTING_TELEMETRY, MICRO_AGENT_SETTINGS,
    SECURITY_AGENT_SETTINGS,
};
use super::stream::{Messages, Source, Task};
use super::GeneratedMessage;
use crate::time::Ticks;

impl Messages {
    /// Decides what a back-end desired patch changes, without applying it.
    fn plan_desired_patch(&mut self, d: usize, slot: TwinSlot, initial: bool) -> DesiredPatch {
        let rng = &mut self.rng;
        let device = &self.fleet[d];
        let layout = device.layout(slot);
        let section = &device.core(slot).desired;
        let settings = settings_of(slot);
        let mut patch = DesiredPatch {
            changes: Vec::new(),
            object_deleted: false,
            version: 0,
            at: NEVER,
        };
        if !initial && layout != Layout::Flat && section.object_present && rng.gen_ratio(1, 50) {
            // Removing the whole object sends the agent back to its defaults.
            patch.object_deleted = true;
            return patch;
        }
        if !initial && !section.entries.is_empty() && rng.gen_ratio(15, 100) {
            for _ in 0..rng.gen_range(1..=2) {
                let entry = section.entries[rng.gen_range(0..section.entries.len())];
                patch.changes.push((entry.setting, None));
            }
        }
        let set_count = if initial {
            rng.gen_range(3..=8)
        } else if patch.changes.is_empty() {
            rng.gen_range(1..=4)
        } else {
            rng.gen_range(0..=1)
        };
        let misconfigured = if rng.gen_ratio(12, 100) {
            Some(rng.gen_range(0..set_count.max(1)))
        } else {
            None
        };
        for position in 0..set_count {
            let index = rng.gen_range(0..settings.len());
            let chosen = pick_candidate(rng, &settings[index], misconfigured == Some(position));
            patch.changes.push((index as u8, Some(chosen)));
        }
        patch.changes.sort_by_key(|&(index, _)| index);
        patch.changes.dedup_by_key(|&mut (index, _)| index);
        patch
    }

    /// Applies `patch` to the desired section of twin `slot`: its `$version` moves by `step`,
    /// and the patch learns that version and its time `at` for its metadata.
    fn apply_desired_patch(
        &mut self,
        d: usize,
        slot: TwinSlot,
        patch: &mut DesiredPatch,
        step: u32,
        at: Ticks,
    ) {
        let device = &mut self.fleet[d];
        let layout = device.layout(slot);
        let section = &mut device.core_mut(slot).desired;
        section.version = section.version.saturating_add(step);
        section.updated_at = at;
        section.updated_version = section.version;
        patch.version = section.version;
        patch.at = at;
        if patch.object_deleted {
            section.entries.clear();
            section.object_present = false;
            return;
        }
        for &(index, change) in &patch.changes {
            match change {
                Some(candidate) => section.set(index, candidate, section.version, at),
                None => section.remove(index),
            }
        }
        if layout != Layout::Flat {
            section.object_present = true;
            section.object_updated_at = at;
            section.object_updated_version = section.version;
        }
    }

    /// A back-end desired patch to twin `slot`; the agent (or device) answers later.
    pub(super) fn desired_patch(
        &mut self,
        d: usize,
        slot: TwinSlot,
        initial: bool,
    ) -> GeneratedMessage {
        let times = self.next_times();
        let mut patch = self.plan_desired_patch(d, slot, initial);
        let step = self.fleet[d].core_mut(slot).bump(&mut self.rng);
        self.apply_desired_patch(d, slot, &mut patch, step, times.0);
        let device = &self.fleet[d];
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("version");
        json.unsigned(device.core(slot).version);
        json.key("properties");
        json.begin_object();
        json.key("desired");
        write_desired_patch(&mut json, device.layout(slot), slot, &patch);
        json.end_object();
        json.end_object();
        self.schedule_answer(d, slot);
        self.fleet_notification(
            d,
            slot,
            Source::TwinChange,
            "updateTwin",
            times,
            json.finish(),
        )
    }

    /// Schedules the agent's (or the device's) report after a desired change; now and then
    /// it is offline and does not answer.
    fn schedule_answer(&mut self, d: usize, slot: TwinSlot) {
        if self.rng.gen_ratio(85, 100) {
            let delay = self.rng.gen_range(1..=25);
            let task = match slot {
                TwinSlot::Device => Task::DeviceReport,
                TwinSlot::Module(module) => Task::AgentReport(module),
            };
            self.schedule(d, delay, task);
        }
    }

    /// The agent reports what it runs with: desired values it accepts, its current ones for
    /// those it rejects, defaults for the rest.
    pub(super) fn agent_report(&mut self, d: usize, module: ModuleSlot) -> GeneratedMessage {
        let times = self.next_times();
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let slot = TwinSlot::Module(module);
        match module {
            ModuleSlot::SecurityAgent => {
                let twin = &mut device.security_agent;
                let object_present = twin.core.desired.object_present;
                for (index, setting) in SECURITY_AGENT_SETTINGS.iter().enumerate() {
                    let desired = if object_present {
                        twin.core.desired.candidate_of(index as u8)
                    } else {
                        None
                    };
                    twin.effective[index] = match desired {
                        Some(candidate) => effective_candidate(
                            setting.candidates,
                            candidate,
                            twin.effective[index],
                        ),
                        None => setting.default,
                    };
                }
                twin.has_reported = true;
                let step = twin.core.bump(rng);
                twin.core.reported_version = twin.core.reported_version.saturating_add(step);
                twin.core.reported_at = times.0;
            }
            ModuleSlot::MicroAgent => {
                let twin = &mut device.micro_agent;
                let mut invalid = 0u32;
                for entry in &twin.core.desired.entries {
                    let setting = &MICRO_AGENT_SETTINGS[usize::from(entry.setting)];
                    if is_rejected(setting, entry.candidate) {
                        invalid |= 1 << entry.setting;
                    }
                }
                twin.invalid_fields = invalid;
                twin.failed = invalid != 0;
                twin.has_reported = true;
                let step = twin.core.bump(rng);
                twin.core.reported_version = twin.core.reported_version.saturating_add(step);
                twin.core.reported_at = times.0;
            }
        }
        let device = &self.fleet[d];
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("version");
        json.unsigned(device.core(slot).version);
        json.key("properties");
        json.begin_object();
        json.key("reported");
        write_reported_section(&mut json, device, slot);
        json.end_object();
        json.end_object();
        self.fleet_notification(
            d,
            slot,
            Source::TwinChange,
            "updateTwin",
            times,
            json.finish(),
        )
    }

    /// The device reports on its own twin: everything the first time, the settings it
    /// applied after a desired change, or its connectivity.
    pub(super) fn device_report(&mut self, d: usize, answering: bool) -> GeneratedMessage {
        let times = self.next_times();
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let desired = &device.core.desired;
        let reported = &mut device.reported;
        let keys = if reported.present == 0 {
            REPORTED_ALL
        } else if answering {
            REPORTED_FIRMWARE | REPORTED_TELEMETRY | REPORTED_LOG_LEVEL
        } else if rng.gen_ratio(7, 10) {
            REPORTED_CONNECTIVITY
        } else {
            REPORTED_FIRMWARE | REPORTED_CONNECTIVITY
        };
        let apply = |setting: u8, current: u8| match desired.candidate_of(setting) {
            Some(candidate) => effective_candidate(
                DEVICE_SETTINGS[usize::from(setting)].candidates,
                candidate,
                current,
            ),
            None if setting == DEVICE_SETTING_FIRMWARE => current,
            None => DEVICE_SETTINGS[usize::from(setting)].default,
        };
        reported.firmware = apply(DEVICE_SETTING_FIRMWARE, reported.firmware);
        reported.telemetry = apply(DEVICE_SETTING_TELEMETRY, reported.telemetry);
        reported.log_level = apply(DEVICE_SETTING_LOG_LEVEL, reported.log_level);
        if keys & REPORTED_CONNECTIVITY != 0 {
            if reported.present & REPORTED_CONNECTIVITY == 0 || rng.gen_ratio(1, 20) {
                reported.network = rng.gen_range(0..NETWORKS.len() as u8);
            }
            reported.signal_dbm = rng.gen_range(-110..=-40);
        }
        reported.present |= keys;
        for bit in 0..4 {
            if keys & (1 << bit) != 0 {
                reported.updated_at[bit] = times.0;
            }
        }
        let step = device.core.bump(rng);
        device.core.reported_version = device.core.reported_version.saturating_add(step);
        device.core.reported_at = times.0;
        let device = &self.fleet[d];
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("version");
        json.unsigned(device.core.version);
        json.key("properties");
        json.begin_object();
        json.key("reported");
        write_device_reported(&mut json, device, keys);
        json.end_object();
        json.end_object();
        self.fleet_notification(
            d,
            TwinSlot::Device,
            Source::TwinChange,
            "updateTwin",
            times,
            json.finish(),
        )
    }

    /// A back-end tag patch on the device twin; with `with_desired`, one operation that also
    /// patches desired properties (as in the documented example).
    pub(super) fn device_tags_patch(&mut self, d: usize, with_desired: bool) -> GeneratedMessage {
        let times = self.next_times();
        let mut desired_patch =
            with_desired.then(|| self.plan_desired_patch(d, TwinSlot::Device, false));
        let tags_patch = self.change_device_tags(d);
        let step = self.fleet[d].core.bump(&mut self.rng);
        if let Some(patch) = desired_patch.as_mut() {
            self.apply_desired_patch(d, TwinSlot::Device, patch, step, times.0);
            self.schedule_answer(d, TwinSlot::Device);
        }
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("version");
        json.unsigned(self.fleet[d].core.version);
        json.key("tags");
        json.raw(&tags_patch);
        if let Some(patch) = &desired_patch {
            json.key("properties");
            json.begin_object();
            json.key("desired");
            write_desired_patch(&mut json, Layout::Flat, TwinSlot::Device, patch);
            json.end_object();
        }
        json.end_object();
        self.fleet_notification(
            d,
            TwinSlot::Device,
            Source::TwinChange,
            "updateTwin",
            times,
            json.finish(),
        )
    }

    /// Changes one tag of device `d` and returns the tag patch that says so.
    fn change_device_tags(&mut self, d: usize) -> Vec<u8> {
        let rng = &mut self.rng;
        let tags = &mut self.fleet[d].tags;
        let mut json = JsonWriter::new();
        json.begin_object();
        match rng.gen_range(0..5) {
            0 => {
                // A move: new site, new building, the region kept (merge patch).
                tags.site = rng.gen_range(0..SITES.len() as u8);
                tags.building = rng.gen_range(1..=40);
                json.key("site");
                json.string(SITES[usize::from(tags.site)]);
                json.key("location");
                json.begin_object();
                json.key("building");
                json.string(&building_name(tags.building));
                json.end_object();
            }
            1 => {
                tags.environment = pick_environment(rng);
                json.key("env");
                json.string(ENVIRONMENTS[usize::from(tags.environment)]);
            }
            2 => {
                json.key("owner");
                if tags.owner > 0 && rng.gen_ratio(1, 2) {
                    tags.owner = 0;
                    json.null();
                } else {
                    tags.owner = rng.gen_range(1..=OWNERS.len() as u8);
                    json.string(OWNERS[usize::from(tags.owner - 1)]);
                }
            }
            3 => {
                tags.tier = rng.gen_range(0..TIERS.len() as u8);
                json.key("tier");
                json.string(TIERS[usize::from(tags.tier)]);
            }
            _ => {
                json.key("location");
                if tags.region > 0 || tags.building > 0 {
                    tags.region = 0;
                    tags.building = 0;
                    json.null();
                } else {
                    tags.region = rng.gen_range(1..=REGIONS.len() as u8);
                    tags.building = rng.gen_range(1..=40);
                    write_location(&mut json, tags.region, tags.building);
                }
            }
        }
        json.end_object();
        json.finish()
    }

    pub(super) fn module_tags_patch(&mut self, d: usize, module: ModuleSlot) -> GeneratedMessage {
        let times = self.next_times();
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let device_environment = device.tags.environment;
        let (core, tags) = match module {
            ModuleSlot::SecurityAgent => (
                &mut device.security_agent.core,
                &mut device.security_agent.tags,
            ),
            ModuleSlot::MicroAgent => (&mut device.micro_agent.core, &mut device.micro_agent.tags),
        };
        let mut tags_json = JsonWriter::new();
        tags_json.begin_object();
        if rng.gen_ratio(1, 2) {
            // Module twins carry the device's environment so configurations can target them.
            tags.environment = device_environment + 1;
            tags_json.key("env");
            tags_json.string(ENVIRONMENTS[usize::from(device_environment) % ENVIRONMENTS.len()]);
        } else {
            tags_json.key("ring");
            if tags.ring > 0 && rng.gen_ratio(1, 3) {
                tags.ring = 0;
                tags_json.null();
            } else {
                tags.ring = rng.gen_range(1..=RINGS.len() as u8);
                tags_json.string(RINGS[usize::from(tags.ring - 1)]);
            }
        }
        tags_json.end_object();
        core.bump(rng);
        let mut json = JsonWriter::new();
        json.begin_object();
        json.key("version");
        json.unsigned(core.version);
        json.key("tags");
        json.raw(&tags_json.finish());
        json.end_object();
        self.fleet_notification(
            d,
            TwinSlot::Module(module),
            Source::TwinChange,
            "updateTwin",
            times,
            json.finish(),
        )
    }

    /// The back end replaces the device's tags wholesale.
    pub(super) fn replace_device_tags(&mut self, d: usize) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let environment = device.tags.environment;
        device.tags = random_device_tags(rng);
        if rng.gen_ratio(8, 10) {
            device.tags.environment = environment;
        }
        device.core.bump(rng);
        let body = full_twin_body(device, &device_id, TwinSlot::Device, false);
        self.fleet_notification(
            d,
            TwinSlot::Device,
            Source::TwinChange,
            "replaceTwin",
            times,
            body,
        )
    }

    /// The back end replaces the desired section of twin `slot` wholesale.
    pub(super) fn replace_desired(&mut self, d: usize, slot: TwinSlot) -> GeneratedMessage {
        let times = self.next_times();
        let device_id = self.device_id(d);
        let rng = &mut self.rng;
        let device = &mut self.fleet[d];
        let layout = device.layout(slot);
        let settings = settings_of(slot);
        let core = device.core_mut(slot);
        let step = core.bump(rng);
        let version = core.desired.version.saturating_add(step);
        let mut section = DesiredSection {
            version,
            updated_at: times.0,
            updated_version: version,
            ..DesiredSection::default()
        };
        let count = rng.gen_range(0..=settings.len().min(8));
        let misconfigured = rng.gen_ratio(12, 100);
        for position in 0..count {
            let index = rng.gen_range(0..settings.len());
            let chosen = pick_candidate(rng, &settings[index], misconfigured && position == 0);
            section.set(index as u8, chosen, version, times.0);
        }
        if layout != Layout::Flat && !section.entries.is_empty() {
            section.object_present = true;
            section.object_updated_at = times.0;
            section.object_updated_version = version;
        }
        core.desired = section;
        let body = full_twin_body(device, &device_id, slot, false);
        self.schedule_answer(d, slot);
        self.fleet_notification(d, slot, Source::TwinChange, "replaceTwin", times, body)
    }
}
