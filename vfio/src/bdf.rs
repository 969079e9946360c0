//! PCI addresses: `domain:bus:device.function`, as sysfs names functions.

use std::fmt;
use std::str::FromStr;

use crate::error::VfioError;

/// A PCI function address (segment/domain, bus, device, function).
///
/// Parses `0000:00:03.0` (any case; the domain may have 1 to 8 hex digits, bus and
/// device 1 or 2) and always displays the kernel's normal form, `0000:00:03.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// Builds an address from its parts, checking device ≤ 0x1f and function ≤ 7.
    pub fn new(domain: u32, bus: u8, device: u8, function: u8) -> Result<Self, VfioError> {
        let input = || format!("{domain:04x}:{bus:02x}:{device:02x}.{function:x}");
        if device > 0x1f {
            return Err(VfioError::InvalidBdf {
                input: input(),
                reason: "device number above 0x1f",
            });
        }
        if function > 7 {
            return Err(VfioError::InvalidBdf {
                input: input(),
                reason: "function number above 7",
            });
        }
        Ok(Bdf {
            domain,
            bus,
            device,
            function,
        })
    }

    /// The PCI domain (segment).
    pub fn domain(&self) -> u32 {
        self.domain
    }

    /// The bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }

    /// The device number (0..=0x1f).
    pub fn device(&self) -> u8 {
        self.device
    }

    /// The function number (0..=7).
    pub fn function(&self) -> u8 {
        self.function
    }
}

fn hex_field(s: &str, max_digits: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for Bdf {
    type Err = VfioError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |reason| VfioError::InvalidBdf {
            input: input.to_string(),
            reason,
        };
        let s = input.trim();
        let (slot, function) = s.rsplit_once('.').ok_or_else(|| bad("no '.function'"))?;
        let parts: Vec<&str> = slot.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, dev] => (*d, *b, *dev),
            [_, _] => return Err(bad("missing domain")),
            _ => return Err(bad("expected domain:bus:device.function")),
        };
        let domain = hex_field(domain, 8).ok_or_else(|| bad("domain is not 1-8 hex digits"))?;
        let bus = hex_field(bus, 2).ok_or_else(|| bad("bus is not 1-2 hex digits"))?;
        let device = hex_field(device, 2).ok_or_else(|| bad("device is not 1-2 hex digits"))?;
        let function = hex_field(function, 1).ok_or_else(|| bad("function is not one digit"))?;
        if device > 0x1f {
            return Err(bad("device number above 0x1f"));
        }
        if function > 7 {
            return Err(bad("function number above 7"));
        }
        // The checks above bound bus, device and function to u8 range.
        Ok(Bdf {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let b: Bdf = "0000:00:03.0".parse().unwrap();
        assert_eq!(b.to_string(), "0000:00:03.0");
        assert_eq!(
            (b.domain(), b.bus(), b.device(), b.function()),
            (0, 0, 3, 0)
        );
        let b: Bdf = " 0000:0A:1F.7\n".parse().unwrap();
        assert_eq!(b.to_string(), "0000:0a:1f.7");
        let b: Bdf = "0:1:2.3".parse().unwrap();
        assert_eq!(b.to_string(), "0000:01:02.3");
        let b: Bdf = "10000:00:00.0".parse().unwrap();
        assert_eq!(b.to_string(), "10000:00:00.0");
    }

    fn reason(s: &str) -> &'static str {
        match s.parse::<Bdf>() {
            Err(VfioError::InvalidBdf { reason, .. }) => reason,
            other => panic!("{s:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_addresses_with_a_reason() {
        assert_eq!(reason("00:03.0"), "missing domain");
        assert_eq!(reason("0000:00:03.8"), "function number above 7");
        assert_eq!(reason("0000:00:20.0"), "device number above 0x1f");
        assert_eq!(reason("0000:0g:03.0"), "bus is not 1-2 hex digits");
        assert_eq!(reason("0000:000:03.0"), "bus is not 1-2 hex digits");
        assert_eq!(reason("0000:00:03"), "no '.function'");
        assert_eq!(reason("0000:00:03.10"), "function is not one digit");
        assert_eq!(reason("zz:00:03.0"), "domain is not 1-8 hex digits");
        assert_eq!(reason("0000:00:+3.0"), "device is not 1-2 hex digits");
        assert_eq!(reason(""), "no '.function'");
        assert_eq!(reason("1:2:3:4.0"), "expected domain:bus:device.function");
    }

    #[test]
    fn new_checks_ranges() {
        assert!(Bdf::new(0, 0, 0x1f, 7).is_ok());
        assert!(Bdf::new(0, 0, 0x20, 0).is_err());
        assert!(Bdf::new(0, 0, 0, 8).is_err());
    }
}
