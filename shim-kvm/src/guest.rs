//! The demo guest: image bytes, load address, parameter block and port map.
//!
//! The image (`guest/demo.asm`, assembled to the committed `guest/demo.bin`)
//! is a multiboot v1 kernel that drops to ring 3 and stamps a working set of
//! pages generation after generation, checking each page still holds the
//! previous generation's stamp. A migration that loses or tears a page shows
//! up as a MISMATCH exit. See `guest/README.md` for the full contract.

use std::fmt;

use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};

/// The assembled image (`guest/demo.bin`), loaded flat at [`LOAD_ADDR`].
pub const IMAGE: &[u8] = include_bytes!("../guest/demo.bin");

/// Guest-physical load address of the image (1 MiB, as in its multiboot header).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Entry point: 32-bit protected mode, ring 0, paging off; the guest then
/// builds its own page tables and enters long mode (see `guest/README.md`).
pub const ENTRY: u64 = 0x10_0020;

/// Guest-physical address of the parameter block the VMM writes before boot.
pub const PARAM_ADDR: u64 = 0x5000;
/// Parameter block magic ("LMGP" little-endian).
pub const PARAM_MAGIC: u32 = 0x5047_4D4C;
/// Parameter block layout version understood by the image.
pub const PARAM_VERSION: u32 = 1;

/// `out` port: sent once on reaching ring 3; 1 = parameters used, 0 = defaults.
pub const PORT_BOOTED: u16 = 0x510;
/// `out` port: pages stamped so far (wrapping u32), every `batch` pages; an
/// idle guest sends 0 every `idle_spins` pauses.
pub const PORT_PROGRESS: u16 = 0x514;
/// `out` port: the generation just completed.
pub const PORT_GENERATION: u16 = 0x518;
/// `out` port: index of a page whose previous stamp was wrong.
pub const PORT_MISMATCH: u16 = 0x51C;

/// Lowest address a working set may start at: above the image page.
pub const MIN_WS_START: u64 = LOAD_ADDR + PAGE_SIZE as u64;

/// What the guest does; written to [`PARAM_ADDR`] by [`load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestParams {
    /// Guest-physical start of the working set (page aligned, >= [`MIN_WS_START`]).
    pub ws_start: u64,
    /// Pages in the working set; 0 makes an idle guest.
    pub ws_pages: u32,
    /// Pages stamped between two PROGRESS exits (non-zero).
    pub batch: u32,
    /// `pause` iterations between two idle PROGRESS exits (non-zero).
    pub idle_spins: u32,
}

impl Default for GuestParams {
    /// The image's own defaults: 4 MiB at 2 MiB, exits every 256 pages.
    fn default() -> Self {
        GuestParams {
            ws_start: 0x20_0000,
            ws_pages: 1024,
            batch: 256,
            idle_spins: 4_000_000,
        }
    }
}

/// Why the guest could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestError {
    /// The working set is misaligned, overlaps the image or leaves RAM/4 GiB.
    BadWorkingSet {
        /// Requested start.
        start: u64,
        /// Requested pages.
        pages: u32,
        /// RAM size.
        ram: u64,
    },
    /// `batch` or `idle_spins` is zero (the guest would count down forever).
    ZeroCount,
    /// Writing into guest RAM failed (RAM too small for the image).
    Memory(MemoryError),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::BadWorkingSet { start, pages, ram } => write!(
                f,
                "working set {pages} pages at {start:#x} is misaligned, below {MIN_WS_START:#x} or beyond RAM ({ram:#x}) / 4 GiB"
            ),
            GuestError::ZeroCount => f.write_str("guest batch and idle_spins must be non-zero"),
            GuestError::Memory(e) => write!(f, "loading the guest: {e}"),
        }
    }
}

impl std::error::Error for GuestError {}

impl GuestParams {
    /// The 24-byte parameter block as the guest reads it.
    pub fn encode(&self) -> [u8; 24] {
        let fields = [
            PARAM_MAGIC,
            PARAM_VERSION,
            self.ws_start as u32,
            self.ws_pages,
            self.batch,
            self.idle_spins,
        ];
        let mut out = [0u8; 24];
        for (chunk, v) in out.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn validate(&self, ram: u64) -> Result<(), GuestError> {
        if self.batch == 0 || self.idle_spins == 0 {
            return Err(GuestError::ZeroCount);
        }
        let end = self.ws_start + u64::from(self.ws_pages) * PAGE_SIZE as u64;
        if self.ws_start % PAGE_SIZE as u64 != 0
            || self.ws_start < MIN_WS_START
            || end > ram
            || end > 1 << 32
        {
            return Err(GuestError::BadWorkingSet {
                start: self.ws_start,
                pages: self.ws_pages,
                ram,
            });
        }
        Ok(())
    }
}

/// Copies the image to [`LOAD_ADDR`] and the parameter block to
/// [`PARAM_ADDR`]; the vCPU must then start at [`ENTRY`].
pub fn load(ram: &GuestRam, params: &GuestParams) -> Result<(), GuestError> {
    params.validate(ram.size())?;
    ram.write(LOAD_ADDR, IMAGE).map_err(GuestError::Memory)?;
    ram.write(PARAM_ADDR, &params.encode())
        .map_err(GuestError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(i: usize) -> u32 {
        u32::from_le_bytes(IMAGE[i * 4..i * 4 + 4].try_into().unwrap())
    }

    #[test]
    fn multiboot_header_matches_constants() {
        assert_eq!(word(0), 0x1BAD_B002);
        assert_eq!(word(0).wrapping_add(word(1)).wrapping_add(word(2)), 0);
        assert_eq!(word(1) & (1 << 16), 1 << 16, "a.out kludge flag");
        assert_eq!(u64::from(word(3)), LOAD_ADDR, "header_addr");
        assert_eq!(u64::from(word(4)), LOAD_ADDR, "load_addr");
        assert_eq!(
            word(5) as usize,
            LOAD_ADDR as usize + IMAGE.len(),
            "load_end"
        );
        assert_eq!(u64::from(word(7)), ENTRY, "entry");
        assert!(IMAGE.len() <= PAGE_SIZE, "image fits its page");
    }

    #[test]
    fn committed_image_matches_source() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/guest");
        let out = std::env::temp_dir().join(format!("livemig-demo-{}.bin", std::process::id()));
        let status = std::process::Command::new("nasm")
            .args(["-f", "bin", "-o"])
            .arg(&out)
            .arg(format!("{dir}/demo.asm"))
            .status();
        match status {
            Ok(s) if s.success() => {
                let built = std::fs::read(&out).unwrap();
                let _ = std::fs::remove_file(&out);
                assert_eq!(built, IMAGE, "guest/demo.bin is stale: run guest/build.sh");
            }
            _ => eprintln!("SKIPPED: nasm not available, demo.bin not re-checked"),
        }
    }

    #[test]
    fn params_validated_and_encoded() {
        let p = GuestParams::default();
        let b = p.encode();
        assert_eq!(&b[0..4], &PARAM_MAGIC.to_le_bytes());
        assert_eq!(&b[12..16], &1024u32.to_le_bytes());
        assert!(p.validate(64 << 20).is_ok());
        assert!(p.validate(4 << 20).is_err());
        let low = GuestParams {
            ws_start: LOAD_ADDR,
            ..p
        };
        assert!(low.validate(64 << 20).is_err());
        let zero = GuestParams { batch: 0, ..p };
        assert_eq!(zero.validate(64 << 20), Err(GuestError::ZeroCount));
        let top = GuestParams {
            ws_start: (4 << 30) - 4096,
            ws_pages: 2,
            ..p
        };
        assert!(top.validate(8 << 30).is_err());
    }
}
