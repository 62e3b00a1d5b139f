//! GPUs as the CUDA driver sees them, read through `libcuda` loaded at run time, so a CPU build
//! reports them too and a machine without a driver is simply reported as such.

use libloading::{Library, Symbol};
use serde::Serialize;
use std::ffi::{c_char, c_int};

const ATTRIBUTE_INTEGRATED: c_int = 18;
const ATTRIBUTE_COMPUTE_MAJOR: c_int = 75;
const ATTRIBUTE_COMPUTE_MINOR: c_int = 76;

#[derive(Debug, Clone, Serialize)]
pub struct GpuDevice {
    pub index: usize,
    pub name: String,
    /// `major.minor`, e.g. `12.1` for GB10.
    pub compute_capability: String,
    pub memory_bytes: u64,
    /// Shares memory with the CPU (DGX Spark's GB10, Jetson).
    pub unified: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct GpuReport {
    /// The kernel driver's version (`/proc/driver/nvidia/version`).
    pub driver: Option<String>,
    /// The highest CUDA version the driver supports, e.g. `13.0`.
    pub cuda_driver_version: Option<String>,
    pub devices: Vec<GpuDevice>,
    /// Why no GPU could be listed.
    pub problem: Option<String>,
}

type CuInit = unsafe extern "C" fn(u32) -> c_int;
type CuGetInt = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;

/// Lists the GPUs.
pub fn probe() -> GpuReport {
    let driver = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|text| kernel_driver_version(&text));
    // SAFETY: loading the CUDA driver library runs its initialisers, which is what every CUDA
    // program does; we only call documented driver API entry points with valid pointers.
    let library = match unsafe { Library::new("libcuda.so.1") } {
        Ok(library) => library,
        Err(_) => {
            let problem = "no NVIDIA driver: libcuda.so.1 is not installed (no GPU, or the driver is not mounted into this container)";
            return GpuReport {
                driver,
                problem: Some(problem.into()),
                ..Default::default()
            };
        }
    };
    match unsafe { list_devices(&library) } {
        Ok((cuda_driver_version, devices)) => GpuReport {
            driver,
            cuda_driver_version: Some(cuda_driver_version),
            devices,
            problem: None,
        },
        Err(problem) => GpuReport {
            driver,
            problem: Some(problem),
            ..Default::default()
        },
    }
}

/// # Safety
/// `library` must be the CUDA driver library.
unsafe fn list_devices(library: &Library) -> Result<(String, Vec<GpuDevice>), String> {
    let symbol = |name: &str| format!("libcuda lacks {name}");
    unsafe {
        let init: Symbol<CuInit> = library.get(b"cuInit").map_err(|_| symbol("cuInit"))?;
        let version: Symbol<CuGetInt> = library
            .get(b"cuDriverGetVersion")
            .map_err(|_| symbol("cuDriverGetVersion"))?;
        let count: Symbol<CuGetInt> = library
            .get(b"cuDeviceGetCount")
            .map_err(|_| symbol("cuDeviceGetCount"))?;
        let get: Symbol<CuDeviceGet> = library
            .get(b"cuDeviceGet")
            .map_err(|_| symbol("cuDeviceGet"))?;
        let name: Symbol<CuDeviceGetName> = library
            .get(b"cuDeviceGetName")
            .map_err(|_| symbol("cuDeviceGetName"))?;
        let attribute: Symbol<CuDeviceGetAttribute> = library
            .get(b"cuDeviceGetAttribute")
            .map_err(|_| symbol("cuDeviceGetAttribute"))?;
        let memory: Symbol<CuDeviceTotalMem> = library
            .get(b"cuDeviceTotalMem_v2")
            .map_err(|_| symbol("cuDeviceTotalMem_v2"))?;
        let status = init(0);
        if status != 0 {
            return Err(format!(
                "the CUDA driver failed to initialise (CUresult {status}); check `nvidia-smi`"
            ));
        }
        let mut driver_version = 0;
        version(&mut driver_version);
        let cuda = format!("{}.{}", driver_version / 1000, (driver_version % 1000) / 10);
        let mut devices = 0;
        count(&mut devices);
        let mut out = Vec::new();
        for index in 0..devices {
            let mut device = 0;
            if get(&mut device, index) != 0 {
                continue;
            }
            let mut raw = [0 as c_char; 256];
            name(raw.as_mut_ptr(), raw.len() as c_int, device);
            let name = std::ffi::CStr::from_ptr(raw.as_ptr())
                .to_string_lossy()
                .into_owned();
            let read = |attr: c_int| {
                let mut value = 0;
                attribute(&mut value, attr, device);
                value
            };
            let mut bytes = 0usize;
            memory(&mut bytes, device);
            out.push(GpuDevice {
                index: index as usize,
                name,
                compute_capability: format!(
                    "{}.{}",
                    read(ATTRIBUTE_COMPUTE_MAJOR),
                    read(ATTRIBUTE_COMPUTE_MINOR)
                ),
                memory_bytes: bytes as u64,
                unified: read(ATTRIBUTE_INTEGRATED) != 0,
            });
        }
        Ok((cuda, out))
    }
}

/// The version number in `/proc/driver/nvidia/version` ("... Kernel Module  580.95.05  ...").
fn kernel_driver_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let after = line
        .split("Kernel Module")
        .nth(1)
        .or_else(|| line.split("Kernel Module for").nth(1))?;
    after
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_driver_version_is_read_from_proc() {
        let text = "NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  580.95.05  Release Build  (dvs-builder@U16)\nGCC version: gcc 13";
        assert_eq!(kernel_driver_version(text).as_deref(), Some("580.95.05"));
        let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024";
        assert_eq!(kernel_driver_version(text).as_deref(), Some("550.54.14"));
        assert_eq!(kernel_driver_version(""), None);
    }

    #[test]
    fn a_probe_either_lists_devices_or_says_why_not() {
        let report = probe();
        match &report.problem {
            Some(problem) => assert!(!problem.is_empty() && report.devices.is_empty()),
            None => {
                assert!(report.cuda_driver_version.is_some());
                for device in &report.devices {
                    assert!(
                        !device.name.is_empty() && device.compute_capability.contains('.'),
                        "{device:?}"
                    );
                }
            }
        }
    }
}
