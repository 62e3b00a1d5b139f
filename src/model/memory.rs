//! How much memory a device has free for conversations' state.

use super::Result;
use candle_core::Device;

/// Bytes free on `device`: the GPU's free memory, or the host's available memory.
pub fn available(device: &Device) -> Result<u64> {
    match device {
        Device::Cpu => host_available(),
        #[cfg(feature = "cuda")]
        Device::Cuda(gpu) => {
            use candle_core::cuda_backend::WrapErr;
            let (free, _total) = gpu.cuda_stream().context().mem_get_info().w()?;
            Ok(free as u64)
        }
        _ => candle_core::bail!("free memory is not known for {device:?}"),
    }
}

/// `MemAvailable` from `/proc/meminfo`.
fn host_available() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    parse_mem_available(&meminfo)
        .ok_or_else(|| candle_core::Error::msg("/proc/meminfo has no MemAvailable line"))
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn this_host_has_some_memory_available() {
        assert!(available(&Device::Cpu).unwrap() > 0);
    }
}
