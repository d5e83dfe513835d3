//! The body writers: the parts of a twin (tags, desired and reported sections with their
//! `$metadata` and `$version`, whole twins) written from the fleet model as IoT Hub writes them.

use super::fleet::{
    etag, settings_of, DesiredSection, Device, DeviceTags, Layout, MicroAgentTwin, ModuleSlot,
    ModuleTags, SecurityAgentTwin, TwinSlot, EDGE_PREFIX, ENVIRONMENTS,
    LEGACY_SECURITY_AGENT_OBJECT, NETWORKS, OWNERS, REGIONS, REPORTED_ALL, REPORTED_CONNECTIVITY,
    REPORTED_FIRMWARE, REPORTED_LOG_LEVEL, REPORTED_TELEMETRY, RINGS, SECURITY_AGENT_OBJECT, SITES,
    TIERS,
};
use super::json::{JsonWriter, NEVER};
use super::settings::{
    candidate_value, SettingValue, DEVICE_SETTINGS, DEVICE_SETTING_FIRMWARE,
    DEVICE_SETTING_LOG_LEVEL, DEVICE_SETTING_TELEMETRY, MICRO_AGENT_SETTINGS,
    SECURITY_AGENT_SETTINGS,
};
use crate::time::Ticks;

/// A setting's value as JSON.
fn write_setting(json: &mut JsonWriter, value: SettingValue) {
    match value {
        SettingValue::Text(text) => json.string(text),
        SettingValue::Integer(number) => json.integer(number),
        SettingValue::Boolean(flag) => json.boolean(flag),
    }
}

fn write_device_tags(json: &mut JsonWriter, tags: &DeviceTags) {
    json.begin_object();
    json.key("env");
    json.string(ENVIRONMENTS[usize::from(tags.environment) % ENVIRONMENTS.len()]);
    json.key("site");
    json.string(SITES[usize::from(tags.site) % SITES.len()]);
    json.key("tier");
    json.string(TIERS[usize::from(tags.tier) % TIERS.len()]);
    if tags.owner > 0 {
        json.key("owner");
        json.string(OWNERS[usize::from(tags.owner - 1) % OWNERS.len()]);
    }
    if tags.region > 0 || tags.building > 0 {
        json.key("location");
        write_location(json, tags.region, tags.building);
    }
    json.end_object();
}

pub(super) fn write_location(json: &mut JsonWriter, region: u8, building: u8) {
    json.begin_object();
    if region > 0 {
        json.key("region");
        json.string(REGIONS[usize::from(region - 1) % REGIONS.len()]);
    }
    if building > 0 {
        json.key("building");
        json.string(&building_name(building));
    }
    json.end_object();
}

pub(super) fn building_name(building: u8) -> String {
    format!("b{building:02}")
}

fn write_module_tags(json: &mut JsonWriter, tags: &ModuleTags) {
    json.begin_object();
    if tags.environment > 0 {
        json.key("env");
        json.string(ENVIRONMENTS[usize::from(tags.environment - 1) % ENVIRONMENTS.len()]);
    }
    if tags.ring > 0 {
        json.key("ring");
        json.string(RINGS[usize::from(tags.ring - 1) % RINGS.len()]);
    }
    json.end_object();
}

/// The whole desired section, as in a replace, create or delete body.
fn write_desired_section(
    json: &mut JsonWriter,
    layout: Layout,
    slot: TwinSlot,
    section: &DesiredSection,
) {
    let settings = settings_of(slot);
    json.begin_object();
    match layout {
        Layout::Flat => {
            for entry in &section.entries {
                let setting = &settings[usize::from(entry.setting)];
                json.key(setting.name);
                write_setting(json, candidate_value(setting, entry.candidate));
            }
        }
        Layout::SecurityAgentObject | Layout::LegacySecurityAgentObject => {
            if section.object_present {
                json.key(object_name(layout));
                json.begin_object();
                for entry in &section.entries {
                    let setting = &settings[usize::from(entry.setting)];
                    json.key(setting.name);
                    write_wrapped(json, layout, candidate_value(setting, entry.candidate));
                }
                json.end_object();
            }
        }
    }
    json.key("$metadata");
    json.begin_object();
    if section.updated_at == NEVER {
        json.stamp(NEVER, None);
    } else {
        json.stamp(section.updated_at, Some(section.updated_version));
    }
    let entry_stamps = |json: &mut JsonWriter| {
        for entry in &section.entries {
            json.key(settings[usize::from(entry.setting)].name);
            write_leaf_metadata(json, layout, entry.updated_at, Some(entry.updated_version));
        }
    };
    match layout {
        Layout::Flat => entry_stamps(json),
        Layout::SecurityAgentObject | Layout::LegacySecurityAgentObject => {
            if section.object_present {
                json.key(object_name(layout));
                json.begin_object();
                json.stamp(
                    section.object_updated_at,
                    Some(section.object_updated_version),
                );
                entry_stamps(json);
                json.end_object();
            }
        }
    }
    json.end_object();
    json.key("$version");
    json.unsigned(u64::from(section.version));
    json.end_object();
}

fn object_name(layout: Layout) -> &'static str {
    match layout {
        Layout::LegacySecurityAgentObject => LEGACY_SECURITY_AGENT_OBJECT,
        _ => SECURITY_AGENT_OBJECT,
    }
}

/// A setting's value: `{"value": x}` under the security agent's object, `x` elsewhere.
fn write_wrapped(json: &mut JsonWriter, layout: Layout, value: SettingValue) {
    if layout == Layout::SecurityAgentObject {
        json.begin_object();
        json.key("value");
        write_setting(json, value);
        json.end_object();
    } else {
        write_setting(json, value);
    }
}

/// The metadata of one setting: a stamp, plus one for the inner `value` when wrapped.
fn write_leaf_metadata(json: &mut JsonWriter, layout: Layout, at: Ticks, version: Option<u32>) {
    json.begin_object();
    json.stamp(at, version);
    if layout == Layout::SecurityAgentObject {
        json.key("value");
        json.begin_object();
        json.stamp(at, version);
        json.end_object();
    }
    json.end_object();
}

/// A desired patch as the back end sent it: the changed keys (a `None` value is a `null`
/// deletion), or the whole security-agent object deleted.
pub(super) struct DesiredPatch {
    pub(super) changes: Vec<(u8, Option<u8>)>,
    pub(super) object_deleted: bool,
    pub(super) version: u32,
    pub(super) at: Ticks,
}

pub(super) fn write_desired_patch(
    json: &mut JsonWriter,
    layout: Layout,
    slot: TwinSlot,
    patch: &DesiredPatch,
) {
    let settings = settings_of(slot);
    let write_changes = |json: &mut JsonWriter| {
        for &(index, change) in &patch.changes {
            let setting = &settings[usize::from(index)];
            json.key(setting.name);
            match change {
                Some(candidate) => write_wrapped(json, layout, candidate_value(setting, candidate)),
                None => json.null(),
            }
        }
    };
    let write_stamps = |json: &mut JsonWriter| {
        // How IoT Hub's metadata shows a deleted key is not documented; deleted keys get none.
        for &(index, change) in &patch.changes {
            if change.is_some() {
                json.key(settings[usize::from(index)].name);
                write_leaf_metadata(json, layout, patch.at, Some(patch.version));
            }
        }
    };
    json.begin_object();
    if layout == Layout::Flat {
        write_changes(json);
    } else {
        json.key(object_name(layout));
        if patch.object_deleted {
            json.null();
        } else {
            json.begin_object();
            write_changes(json);
            json.end_object();
        }
    }
    json.key("$metadata");
    json.begin_object();
    json.stamp(patch.at, Some(patch.version));
    if layout == Layout::Flat {
        write_stamps(json);
    } else if !patch.object_deleted {
        json.key(object_name(layout));
        json.begin_object();
        json.stamp(patch.at, Some(patch.version));
        write_stamps(json);
        json.end_object();
    }
    json.end_object();
    json.key("$version");
    json.unsigned(u64::from(patch.version));
    json.end_object();
}

/// The device's reported section with the keys in `keys` (`REPORTED_*` bits).
pub(super) fn write_device_reported(json: &mut JsonWriter, device: &Device, keys: u8) {
    let reported = &device.reported;
    let keys = keys & reported.present;
    let names = [
        "firmwareVersion",
        "telemetryIntervalSeconds",
        "logLevel",
        "connectivity",
    ];
    json.begin_object();
    for (bit, name) in names.iter().enumerate() {
        if keys & (1 << bit) == 0 {
            continue;
        }
        json.key(name);
        match 1u8 << bit {
            REPORTED_FIRMWARE => write_setting(
                json,
                candidate_value(
                    &DEVICE_SETTINGS[usize::from(DEVICE_SETTING_FIRMWARE)],
                    reported.firmware,
                ),
            ),
            REPORTED_TELEMETRY => write_setting(
                json,
                candidate_value(
                    &DEVICE_SETTINGS[usize::from(DEVICE_SETTING_TELEMETRY)],
                    reported.telemetry,
                ),
            ),
            REPORTED_LOG_LEVEL => write_setting(
                json,
                candidate_value(
                    &DEVICE_SETTINGS[usize::from(DEVICE_SETTING_LOG_LEVEL)],
                    reported.log_level,
                ),
            ),
            _ => {
                json.begin_object();
                json.key("type");
                json.string(NETWORKS[usize::from(reported.network) % NETWORKS.len()]);
                json.key("signalStrength");
                json.integer(i64::from(reported.signal_dbm));
                json.end_object();
            }
        }
    }
    json.key("$metadata");
    json.begin_object();
    json.stamp(device.core.reported_at, None);
    for (bit, name) in names.iter().enumerate() {
        if keys & (1 << bit) == 0 {
            continue;
        }
        let at = reported.updated_at[bit];
        json.key(name);
        json.begin_object();
        json.stamp(at, None);
        if 1u8 << bit == REPORTED_CONNECTIVITY {
            for leaf in ["type", "signalStrength"] {
                json.key(leaf);
                json.begin_object();
                json.stamp(at, None);
                json.end_object();
            }
        }
        json.end_object();
    }
    json.end_object();
    json.key("$version");
    json.unsigned(u64::from(device.core.reported_version));
    json.end_object();
}

/// The security agent's reported section: its whole effective configuration.
fn write_security_agent_reported(json: &mut JsonWriter, twin: &SecurityAgentTwin) {
    let layout = if twin.legacy_object {
        Layout::LegacySecurityAgentObject
    } else {
        Layout::SecurityAgentObject
    };
    let at = twin.core.reported_at;
    json.begin_object();
    if twin.has_reported {
        json.key(object_name(layout));
        json.begin_object();
        for (setting, &candidate) in SECURITY_AGENT_SETTINGS.iter().zip(&twin.effective) {
            json.key(setting.name);
            write_wrapped(json, layout, candidate_value(setting, candidate));
        }
        json.end_object();
    }
    json.key("$metadata");
    json.begin_object();
    json.stamp(at, None);
    if twin.has_reported {
        json.key(object_name(layout));
        json.begin_object();
        json.stamp(at, None);
        for setting in SECURITY_AGENT_SETTINGS {
            json.key(setting.name);
            write_leaf_metadata(json, layout, at, None);
        }
        json.end_object();
    }
    json.end_object();
    json.key("$version");
    json.unsigned(u64::from(twin.core.reported_version));
    json.end_object();
}

/// The micro agent's reported section: `latest_state` and `latest_invalid_fields`.
fn write_micro_agent_reported(json: &mut JsonWriter, twin: &MicroAgentTwin) {
    let at = twin.core.reported_at;
    json.begin_object();
    if twin.has_reported {
        json.key("latest_state");
        json.string(if twin.failed { "failed" } else { "success" });
        json.key("latest_invalid_fields");
        json.begin_array();
        for (index, setting) in MICRO_AGENT_SETTINGS.iter().enumerate() {
            if twin.invalid_fields & (1 << index) != 0 {
                json.string(setting.name);
            }
        }
        json.end_array();
    }
    json.key("$metadata");
    json.begin_object();
    json.stamp(at, None);
    if twin.has_reported {
        for key in ["latest_state", "latest_invalid_fields"] {
            json.key(key);
            json.begin_object();
            json.stamp(at, None);
            json.end_object();
        }
    }
    json.end_object();
    json.key("$version");
    json.unsigned(u64::from(twin.core.reported_version));
    json.end_object();
}

pub(super) fn write_reported_section(json: &mut JsonWriter, device: &Device, slot: TwinSlot) {
    match slot {
        TwinSlot::Device => write_device_reported(json, device, REPORTED_ALL),
        TwinSlot::Module(ModuleSlot::SecurityAgent) => {
            write_security_agent_reported(json, &device.security_agent)
        }
        TwinSlot::Module(ModuleSlot::MicroAgent) => {
            write_micro_agent_reported(json, &device.micro_agent)
        }
    }
}

/// The whole twin: the body of lifecycle and `replaceTwin` notifications. Lifecycle bodies of
/// device twins also carry identity fields; replace bodies do not (as in the documented
/// example; whether the service adds them is not known).
pub(super) fn full_twin_body(
    device: &Device,
    device_id: &str,
    slot: TwinSlot,
    lifecycle: bool,
) -> Vec<u8> {
    let core = device.core(slot);
    let mut json = JsonWriter::new();
    json.begin_object();
    json.key("deviceId");
    json.string(device_id);
    if let TwinSlot::Module(module) = slot {
        json.key("moduleId");
        json.string(module.module_id());
    }
    json.key("etag");
    json.string(&etag(core.version));
    json.key("version");
    json.unsigned(core.version);
    if lifecycle && slot == TwinSlot::Device {
        json.key("status");
        json.string("enabled");
        json.key("authenticationType");
        json.string("sas");
        json.key("capabilities");
        json.begin_object();
        json.key("iotEdge");
        json.boolean(device.prefix == EDGE_PREFIX);
        json.end_object();
        if device.prefix == EDGE_PREFIX {
            json.key("deviceScope");
            json.string(&format!(
                "ms-azure-iot-edge://{device_id}-{}",
                device.incarnation
            ));
        }
    }
    match slot {
        TwinSlot::Device => {
            json.key("tags");
            write_device_tags(&mut json, &device.tags);
        }
        TwinSlot::Module(module) => {
            let tags = match module {
                ModuleSlot::SecurityAgent => &device.security_agent.tags,
                ModuleSlot::MicroAgent => &device.micro_agent.tags,
            };
            if !tags.is_empty() {
                json.key("tags");
                write_module_tags(&mut json, tags);
            }
        }
    }
    json.key("properties");
    json.begin_object();
    json.key("desired");
    write_desired_section(&mut json, device.layout(slot), slot, &core.desired);
    json.key("reported");
    write_reported_section(&mut json, device, slot);
    json.end_object();
    json.end_object();
    json.finish()
}
