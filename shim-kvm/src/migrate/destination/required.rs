//! The sections a destination requires, as the engine takes them.
//!
//! [`DestinationEngine::require_sections`] keeps a `'static` list (the
//! engine is `no_std` and owns nothing), while a VMM registers its
//! sections at run time. Each distinct id and each distinct list is
//! therefore leaked once and reused: the memory is bounded by the
//! configurations a process receives into, not by how many migrations it
//! receives.
//!
//! [`DestinationEngine::require_sections`]: livemig_core::destination::DestinationEngine::require_sections

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, PoisonError};

use livemig_core::destination::{DestError, MAX_REQUIRED_SECTIONS, RequiredSection, SectionDue};

use super::super::sections::{CPU_MODEL_SECTION, CPU_SECTION, RUNSTATE_SECTION, VM_SECTION};
use crate::vmm::DeviceSection;

/// Every id and list handed out so far.
#[derive(Default)]
struct Interned {
    ids: HashSet<&'static str>,
    lists: HashSet<&'static [RequiredSection]>,
}

fn interned() -> &'static Mutex<Interned> {
    static INTERNED: OnceLock<Mutex<Interned>> = OnceLock::new();
    INTERNED.get_or_init(Mutex::default)
}

/// The sections a guest with `vcpus` vCPUs and the VMM's `devices` cannot
/// start without: the CPU model and runstate (sent at setup), each vCPU,
/// the VM-wide devices, and every device the VMM registered.
pub(super) fn sections(
    vcpus: u32,
    devices: &[Box<dyn DeviceSection>],
) -> Result<&'static [RequiredSection], DestError> {
    let count = 3 + vcpus as usize + devices.len();
    if count > MAX_REQUIRED_SECTIONS {
        return Err(DestError::TooManyRequiredSections { count });
    }
    let mut books = interned().lock().unwrap_or_else(PoisonError::into_inner);
    let mut list = vec![
        RequiredSection {
            id: CPU_MODEL_SECTION,
            instance: 0,
            due: SectionDue::SetupCheck,
        },
        RequiredSection {
            id: RUNSTATE_SECTION,
            instance: 0,
            due: SectionDue::SetupCheck,
        },
        RequiredSection {
            id: VM_SECTION,
            instance: 0,
            due: SectionDue::Switchover,
        },
    ];
    list.extend((0..vcpus).map(|instance| RequiredSection {
        id: CPU_SECTION,
        instance,
        due: SectionDue::Switchover,
    }));
    for device in devices {
        let id = match books.ids.get(device.id()) {
            Some(&id) => id,
            None => {
                let id: &'static str = Box::leak(device.id().to_string().into_boxed_str());
                books.ids.insert(id);
                id
            }
        };
        list.push(RequiredSection {
            id,
            instance: device.instance(),
            due: SectionDue::Switchover,
        });
    }
    if let Some(&known) = books.lists.get(list.as_slice()) {
        return Ok(known);
    }
    let list: &'static [RequiredSection] = Box::leak(list.into_boxed_slice());
    books.lists.insert(list);
    Ok(list)
}
