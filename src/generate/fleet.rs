//! The fleet model: a compact state per twin (versions, desired entries as candidate indices,
//! what the agents run with), never a JSON document, and the names the fleet is made of.

use base64::Engine as _;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::json::NEVER;
use super::settings::{
    Setting, DEVICE_SETTINGS, MICRO_AGENT_SETTINGS, SECURITY_AGENT_SETTINGS,
    SECURITY_AGENT_SETTING_COUNT,
};
use crate::time::Ticks;

pub(super) const SECURITY_AGENT_MODULE: &str = "azureiotsecurity";
pub(super) const MICRO_AGENT_MODULE: &str = "DefenderIotMicroAgent";
pub(super) const SECURITY_AGENT_OBJECT: &str =
    "ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration";
/// The preview name, whose settings are flat values rather than `{"value": x}`.
pub(super) const LEGACY_SECURITY_AGENT_OBJECT: &str =
    "azureiot*com^securityAgentConfiguration^1*0*0";

/// Device-id prefixes; the last one marks IoT Edge devices.
pub(super) const DEVICE_PREFIXES: [&str; 5] = ["gw", "sensor", "cam", "meter", "edge"];
pub(super) const EDGE_PREFIX: u8 = 4;
pub(super) const ENVIRONMENTS: [&str; 3] = ["prod", "staging", "dev"];
pub(super) const SITES: [&str; 16] = [
    "amsterdam-1",
    "berlin-2",
    "chicago-1",
    "dallas-3",
    "dublin-1",
    "frankfurt-2",
    "houston-1",
    "lyon-1",
    "madrid-2",
    "milan-1",
    "osaka-1",
    "oslo-1",
    "seattle-2",
    "singapore-1",
    "sydney-1",
    "toronto-1",
];
pub(super) const TIERS: [&str; 3] = ["gold", "silver", "bronze"];
pub(super) const OWNERS: [&str; 4] = ["ops-emea", "ops-americas", "field-service", "research"];
pub(super) const REGIONS: [&str; 6] = [
    "westeurope",
    "northeurope",
    "eastus",
    "southcentralus",
    "japaneast",
    "australiaeast",
];
pub(super) const RINGS: [&str; 3] = ["canary", "early", "broad"];
pub(super) const NETWORKS: [&str; 3] = ["ethernet", "wifi", "cellular"];

/// Weighted pick of an index into `weights`.
pub(super) fn pick_weighted(rng: &mut ChaCha8Rng, weights: &[u32]) -> usize {
    let total: u32 = weights.iter().sum();
    if total == 0 {
        return 0;
    }
    let mut roll = rng.gen_range(0..total);
    for (index, &weight) in weights.iter().enumerate() {
        if roll < weight {
            return index;
        }
        roll -= weight;
    }
    weights.len() - 1
}

pub(super) fn pick_environment(rng: &mut ChaCha8Rng) -> u8 {
    pick_weighted(rng, &[70, 20, 10]) as u8
}

pub(super) fn etag(version: u64) -> String {
    base64::engine::general_purpose::STANDARD.encode(version.to_be_bytes())
}

/// One desired key as set by the back end.
#[derive(Debug, Clone, Copy)]
pub(super) struct DesiredEntry {
    pub(super) setting: u8,
    pub(super) candidate: u8,
    pub(super) updated_version: u32,
    pub(super) updated_at: Ticks,
}

/// How a twin's settings sit in its desired and reported sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// Keys directly under the section (device twins, the micro agent).
    Flat,
    /// Under the security agent's object, each value wrapped `{"value": x}`.
    SecurityAgentObject,
    /// Under the preview object name, values flat.
    LegacySecurityAgentObject,
}

#[derive(Debug, Clone, Default)]
pub(super) struct DesiredSection {
    pub(super) version: u32,
    pub(super) updated_at: Ticks,
    pub(super) updated_version: u32,
    /// Whether the security agent's configuration object exists (unused for flat layouts).
    pub(super) object_present: bool,
    pub(super) object_updated_at: Ticks,
    pub(super) object_updated_version: u32,
    /// Sorted by setting index, at most one entry per setting.
    pub(super) entries: Vec<DesiredEntry>,
}

impl DesiredSection {
    fn fresh() -> Self {
        DesiredSection {
            version: 1,
            ..DesiredSection::default()
        }
    }

    pub(super) fn candidate_of(&self, setting: u8) -> Option<u8> {
        self.entries
            .binary_search_by_key(&setting, |entry| entry.setting)
            .ok()
            .map(|position| self.entries[position].candidate)
    }

    pub(super) fn set(&mut self, setting: u8, candidate: u8, version: u32, at: Ticks) {
        let entry = DesiredEntry {
            setting,
            candidate,
            updated_version: version,
            updated_at: at,
        };
        match self
            .entries
            .binary_search_by_key(&setting, |entry| entry.setting)
        {
            Ok(position) => self.entries[position] = entry,
            Err(position) => self.entries.insert(position, entry),
        }
    }

    pub(super) fn remove(&mut self, setting: u8) {
        if let Ok(position) = self
            .entries
            .binary_search_by_key(&setting, |entry| entry.setting)
        {
            self.entries.remove(position);
        }
    }
}

/// What every twin has.
#[derive(Debug, Clone, Default)]
pub(super) struct TwinCore {
    pub(super) live: bool,
    pub(super) version: u64,
    pub(super) desired: DesiredSection,
    pub(super) reported_version: u32,
    pub(super) reported_at: Ticks,
}

impl TwinCore {
    /// A twin as a create operation leaves it: version 2, empty sections at `$version` 1,
    /// as in the documented module-create notification.
    pub(super) fn created() -> Self {
        TwinCore {
            live: true,
            version: 2,
            desired: DesiredSection::fresh(),
            reported_version: 1,
            reported_at: NEVER,
        }
    }

    /// Advances the top-level version for one change, and returns how far a section's
    /// `$version` moves with it: usually 1, now and then more, as when IoT Hub coalesces
    /// notifications.
    pub(super) fn bump(&mut self, rng: &mut ChaCha8Rng) -> u32 {
        let extra: u32 = if rng.gen_ratio(3, 100) {
            rng.gen_range(1..=2)
        } else {
            0
        };
        self.version = self.version.saturating_add(1 + u64::from(extra));
        1 + extra
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct DeviceTags {
    pub(super) environment: u8,
    pub(super) site: u8,
    pub(super) tier: u8,
    /// Index + 1 into [`OWNERS`]; 0: no owner tag.
    pub(super) owner: u8,
    /// Index + 1 into [`REGIONS`]; 0: no region in `location`.
    pub(super) region: u8,
    /// Building number; 0: no building in `location`. No region and no building: no
    /// `location` tag.
    pub(super) building: u8,
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ModuleTags {
    /// Index + 1 into [`ENVIRONMENTS`] (copied from the device); 0: none.
    pub(super) environment: u8,
    /// Index + 1 into [`RINGS`]; 0: none.
    pub(super) ring: u8,
}

impl ModuleTags {
    pub(super) fn is_empty(&self) -> bool {
        self.environment == 0 && self.ring == 0
    }
}

pub(super) const REPORTED_FIRMWARE: u8 = 1;
pub(super) const REPORTED_TELEMETRY: u8 = 2;
pub(super) const REPORTED_LOG_LEVEL: u8 = 4;
pub(super) const REPORTED_CONNECTIVITY: u8 = 8;
pub(super) const REPORTED_ALL: u8 = 15;

/// What a device reports on its own twin.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct DeviceReported {
    /// `REPORTED_*` bits of the keys present.
    pub(super) present: u8,
    /// Candidate indices into [`DEVICE_SETTINGS`].
    pub(super) firmware: u8,
    pub(super) telemetry: u8,
    pub(super) log_level: u8,
    pub(super) network: u8,
    pub(super) signal_dbm: i8,
    /// When each key was last written, by bit position.
    pub(super) updated_at: [Ticks; 4],
}

#[derive(Debug, Clone)]
pub(super) struct SecurityAgentTwin {
    pub(super) core: TwinCore,
    pub(super) tags: ModuleTags,
    pub(super) legacy_object: bool,
    pub(super) has_reported: bool,
    /// The configuration the agent runs with: a candidate index per setting.
    pub(super) effective: [u8; SECURITY_AGENT_SETTING_COUNT],
}

#[derive(Debug, Clone, Default)]
pub(super) struct MicroAgentTwin {
    pub(super) core: TwinCore,
    pub(super) tags: ModuleTags,
    pub(super) has_reported: bool,
    pub(super) failed: bool,
    /// Bit per setting index: fields the agent reported invalid.
    pub(super) invalid_fields: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum ModuleSlot {
    SecurityAgent,
    MicroAgent,
}

impl ModuleSlot {
    pub(super) fn module_id(self) -> &'static str {
        match self {
            ModuleSlot::SecurityAgent => SECURITY_AGENT_MODULE,
            ModuleSlot::MicroAgent => MICRO_AGENT_MODULE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TwinSlot {
    Device,
    Module(ModuleSlot),
}

#[derive(Debug, Clone)]
pub(super) struct Device {
    pub(super) prefix: u8,
    /// Counts re-creations, so tasks scheduled for an earlier identity are dropped.
    pub(super) incarnation: u32,
    /// Deleted for good: only picked again when nothing else can be.
    pub(super) retired: bool,
    /// Which security modules this device gets (again) when it is created.
    pub(super) plans_security_agent: bool,
    pub(super) plans_micro_agent: bool,
    pub(super) core: TwinCore,
    pub(super) tags: DeviceTags,
    pub(super) reported: DeviceReported,
    pub(super) security_agent: SecurityAgentTwin,
    pub(super) micro_agent: MicroAgentTwin,
}

impl Device {
    pub(super) fn core(&self, slot: TwinSlot) -> &TwinCore {
        match slot {
            TwinSlot::Device => &self.core,
            TwinSlot::Module(ModuleSlot::SecurityAgent) => &self.security_agent.core,
            TwinSlot::Module(ModuleSlot::MicroAgent) => &self.micro_agent.core,
        }
    }

    pub(super) fn core_mut(&mut self, slot: TwinSlot) -> &mut TwinCore {
        match slot {
            TwinSlot::Device => &mut self.core,
            TwinSlot::Module(ModuleSlot::SecurityAgent) => &mut self.security_agent.core,
            TwinSlot::Module(ModuleSlot::MicroAgent) => &mut self.micro_agent.core,
        }
    }

    pub(super) fn module_live(&self, slot: ModuleSlot) -> bool {
        self.core(TwinSlot::Module(slot)).live
    }

    pub(super) fn layout(&self, slot: TwinSlot) -> Layout {
        match slot {
            TwinSlot::Module(ModuleSlot::SecurityAgent) if self.security_agent.legacy_object => {
                Layout::LegacySecurityAgentObject
            }
            TwinSlot::Module(ModuleSlot::SecurityAgent) => Layout::SecurityAgentObject,
            _ => Layout::Flat,
        }
    }
}

pub(super) fn settings_of(slot: TwinSlot) -> &'static [Setting] {
    match slot {
        TwinSlot::Device => DEVICE_SETTINGS,
        TwinSlot::Module(ModuleSlot::SecurityAgent) => SECURITY_AGENT_SETTINGS,
        TwinSlot::Module(ModuleSlot::MicroAgent) => MICRO_AGENT_SETTINGS,
    }
}

pub(super) fn default_effective() -> [u8; SECURITY_AGENT_SETTING_COUNT] {
    let mut effective = [0u8; SECURITY_AGENT_SETTING_COUNT];
    for (slot, setting) in effective.iter_mut().zip(SECURITY_AGENT_SETTINGS) {
        *slot = setting.default;
    }
    effective
}

pub(super) fn random_device_tags(rng: &mut ChaCha8Rng) -> DeviceTags {
    let with_location = rng.gen_ratio(6, 10);
    DeviceTags {
        environment: pick_environment(rng),
        site: rng.gen_range(0..SITES.len() as u8),
        tier: pick_weighted(rng, &[20, 50, 30]) as u8,
        owner: if rng.gen_ratio(4, 10) {
            rng.gen_range(1..=OWNERS.len() as u8)
        } else {
            0
        },
        region: if with_location {
            rng.gen_range(1..=REGIONS.len() as u8)
        } else {
            0
        },
        building: if with_location {
            rng.gen_range(1..=40)
        } else {
            0
        },
    }
}

pub(super) fn random_module_tags(rng: &mut ChaCha8Rng, device_environment: u8) -> ModuleTags {
    ModuleTags {
        environment: if rng.gen_ratio(3, 10) {
            device_environment + 1
        } else {
            0
        },
        ring: if rng.gen_ratio(2, 10) {
            rng.gen_range(1..=RINGS.len() as u8)
        } else {
            0
        },
    }
}
