//! COM1: vm-superio's 16550 on ports `0x3f8 ..= 0x3ff` (the demo guest's
//! [`guest::PORT_SERIAL`]), its interrupt wired
//! to the in-kernel irqchip's IRQ 4 through an irqfd, its transmitted
//! bytes collected for the VMM to read, and its registers as a device
//! section.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::guest;
use kvm_ioctls::VmFd;
use livemig_kvm::vmm::{DeviceSection, VmmError};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Ports COM1 decodes from [`guest::PORT_SERIAL`].
pub const COM1_PORTS: u16 = 8;
/// COM1's interrupt line on the PIC / IOAPIC.
pub const COM1_IRQ: u32 = 4;

/// The serial port's interrupt: an eventfd the irqchip listens to.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqLine, NoEvents, Vec<u8>>;

/// COM1, shared between the vCPU threads (port I/O) and the VMM.
#[derive(Debug, Clone)]
pub struct SerialPort {
    uart: Arc<Mutex<Uart>>,
}

fn lock(m: &Mutex<Uart>) -> MutexGuard<'_, Uart> {
    // A panic in a register access leaves the registers as they were.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SerialPort {
    /// A reset 16550 whose interrupt raises IRQ [`COM1_IRQ`] of `vm`'s
    /// in-kernel irqchip.
    pub fn new(vm: &VmFd) -> Result<SerialPort, std::io::Error> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&evt, COM1_IRQ)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(SerialPort {
            uart: Arc::new(Mutex::new(Serial::new(IrqLine(evt), Vec::new()))),
        })
    }

    /// Whether `port` is one of COM1's.
    pub fn decodes(port: u16) -> bool {
        (guest::PORT_SERIAL..guest::PORT_SERIAL + COM1_PORTS).contains(&port)
    }

    /// A guest `out` to `port` (one of COM1's).
    pub fn write(
        &self,
        port: u16,
        value: u8,
    ) -> Result<(), vm_superio::serial::Error<std::io::Error>> {
        lock(&self.uart).write((port - guest::PORT_SERIAL) as u8, value)
    }

    /// A guest `in` from `port` (one of COM1's).
    pub fn read(&self, port: u16) -> u8 {
        lock(&self.uart).read((port - guest::PORT_SERIAL) as u8)
    }

    /// The bytes the guest transmitted since the last call.
    pub fn take_output(&self) -> Vec<u8> {
        std::mem::take(lock(&self.uart).writer_mut())
    }

    /// The port's registers and receive FIFO.
    pub fn state(&self) -> SerialState {
        lock(&self.uart).state()
    }

    /// Replaces the registers and receive FIFO with `state`, keeping the
    /// interrupt line and the collected output.
    pub fn set_state(&self, state: &SerialState) -> Result<(), SerialStateError> {
        let mut uart = lock(&self.uart);
        let irq = uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(SerialStateError::Irq)?;
        let out = std::mem::take(uart.writer_mut());
        *uart = Serial::from_state(state, IrqLine(irq), NoEvents, out)
            .map_err(|_| SerialStateError::FifoTooLong(state.in_buffer.len()))?;
        Ok(())
    }

    /// The port as a migration section.
    pub fn section(&self) -> SerialSection {
        SerialSection { port: self.clone() }
    }
}

/// Why a serial section could not be loaded.
#[derive(Debug)]
pub enum SerialStateError {
    /// The blob is shorter than its registers and FIFO length say.
    Truncated {
        /// Bytes the blob has.
        len: usize,
    },
    /// Bytes follow the FIFO.
    Trailing {
        /// Bytes left over.
        extra: usize,
    },
    /// The receive FIFO holds more bytes than a 16550's (64).
    FifoTooLong(usize),
    /// Duplicating the interrupt eventfd failed.
    Irq(std::io::Error),
}

impl fmt::Display for SerialStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialStateError::Truncated { len } => {
                write!(f, "serial state of {len} bytes is truncated")
            }
            SerialStateError::Trailing { extra } => {
                write!(f, "serial state has {extra} bytes past its receive FIFO")
            }
            SerialStateError::FifoTooLong(n) => {
                write!(
                    f,
                    "serial receive FIFO of {n} bytes is longer than a 16550's"
                )
            }
            SerialStateError::Irq(e) => write!(f, "serial interrupt line: {e}"),
        }
    }
}

impl std::error::Error for SerialStateError {}

/// Bytes of the registers in [`encode`]: nine, then the FIFO's u16 length.
const REGISTERS: usize = 9;

/// The state as bytes: the nine registers, the FIFO length (u16 LE), the
/// FIFO.
pub fn encode(s: &SerialState, out: &mut Vec<u8>) {
    out.extend_from_slice(&[
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ]);
    // A 16550's FIFO holds 64 bytes: the length always fits.
    out.extend_from_slice(&(s.in_buffer.len() as u16).to_le_bytes());
    out.extend_from_slice(&s.in_buffer);
}

/// Parses [`encode`]'s bytes.
pub fn decode(b: &[u8]) -> Result<SerialState, SerialStateError> {
    let truncated = SerialStateError::Truncated { len: b.len() };
    let (regs, rest) = b.split_at_checked(REGISTERS).ok_or(truncated)?;
    let (len, fifo) = rest
        .split_at_checked(2)
        .ok_or(SerialStateError::Truncated { len: b.len() })?;
    let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
    let (in_buffer, extra) = fifo
        .split_at_checked(len)
        .ok_or(SerialStateError::Truncated { len: b.len() })?;
    if !extra.is_empty() {
        return Err(SerialStateError::Trailing { extra: extra.len() });
    }
    Ok(SerialState {
        baud_divisor_low: regs[0],
        baud_divisor_high: regs[1],
        interrupt_enable: regs[2],
        interrupt_identification: regs[3],
        line_control: regs[4],
        line_status: regs[5],
        modem_control: regs[6],
        modem_status: regs[7],
        scratch: regs[8],
        in_buffer: in_buffer.to_vec(),
    })
}

/// COM1's registers and receive FIFO as section `serial` version 1.
#[derive(Debug)]
pub struct SerialSection {
    port: SerialPort,
}

impl DeviceSection for SerialSection {
    fn id(&self) -> &str {
        "serial"
    }

    fn version(&self) -> u32 {
        1
    }

    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), VmmError> {
        encode(&self.port.state(), out);
        Ok(())
    }

    fn load(&mut self, _version: u32, data: &[u8]) -> Result<(), VmmError> {
        let state = decode(data)?;
        self.port.set_state(&state)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_bad_blobs_are_named() {
        let s = SerialState {
            line_control: 0x83,
            scratch: 0x5a,
            in_buffer: b"abc".to_vec(),
            ..SerialState::default()
        };
        let mut b = Vec::new();
        encode(&s, &mut b);
        assert_eq!(b.len(), REGISTERS + 2 + 3);
        assert_eq!(decode(&b).unwrap(), s);
        for cut in [0, REGISTERS, REGISTERS + 1, b.len() - 1] {
            assert!(
                matches!(decode(&b[..cut]), Err(SerialStateError::Truncated { len }) if len == cut),
                "cut at {cut}"
            );
        }
        b.push(0);
        assert!(matches!(
            decode(&b),
            Err(SerialStateError::Trailing { extra: 1 })
        ));
    }
}
