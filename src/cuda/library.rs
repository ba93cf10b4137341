//! Finding the CUDA driver and NVRTC at run time.
//!
//! cudarc opens both with `dlopen` by name and panics when a library is missing, so every path
//! into it first goes through [`driver`] or [`nvrtc`], which check with `is_culib_present` and
//! turn a missing library into an [`Error::Cuda`] that says what was looked for and where.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// Where pip's NVIDIA wheels put NVRTC under a `site-packages` folder, newest first, with the
/// library's file name and its CUDA major version: CUDA 13's `nvidia-cuda-nvrtc` and CUDA 12's
/// `nvidia-cuda-nvrtc-cu12`.
const PIP_NVRTC: [(&str, &str, u32); 2] =
    [("nvidia/cu13/lib", "libnvrtc.so.13", 13), ("nvidia/cuda_nvrtc/lib", "libnvrtc.so.12", 12)];

/// Toolkit folders NVRTC is also looked for in, after the dynamic loader's own search.
const TOOLKIT_ENV: [&str; 2] = ["CUDA_HOME", "CUDA_PATH"];
const TOOLKIT_DEFAULT: &str = "/usr/local/cuda";

static SEARCH_ROOTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Adds folders (such as Python's `site-packages`) under which pip's NVRTC wheels may be installed.
/// The bindings pass `sys.path` here before the first CUDA call.
pub fn add_search_roots(roots: impl IntoIterator<Item = PathBuf>) {
    let mut known = SEARCH_ROOTS.lock().unwrap_or_else(|p| p.into_inner());
    for root in roots {
        if !known.contains(&root) {
            known.push(root);
        }
    }
}

/// Ok when the CUDA driver library can be loaded; else the error every CUDA entry point reports.
pub fn driver() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the driver by its usual names and closes it again.
    if *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() }) {
        return Ok(());
    }
    Err(Error::Cuda(
        "no CUDA driver was found: libcuda.so.1 (the NVIDIA driver's library) could not be loaded from the \
         dynamic loader's path (LD_LIBRARY_PATH, /etc/ld.so.cache); this machine has no NVIDIA driver, so use \
         device='cpu'"
            .into(),
    ))
}

/// Ok when NVRTC can be loaded: by the dynamic loader's search, else preloaded from a pip wheel's
/// folder or a toolkit folder so that cudarc's later `dlopen` by name finds it already loaded.
pub fn nvrtc() -> Result<()> {
    static LOADED: Mutex<bool> = Mutex::new(false);
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: only tries to dlopen NVRTC by its usual names and closes it again.
    if *loaded || unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        *loaded = true;
        return Ok(());
    }
    let candidates = nvrtc_candidates();
    for candidate in &candidates {
        if candidate.is_file() && preload_with_builtins(candidate) {
            *loaded = true;
            return Ok(());
        }
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(Error::Cuda(format!(
        "NVRTC (the CUDA run-time compiler, libnvrtc.so) was not found: not on the dynamic loader's path \
         (LD_LIBRARY_PATH, /etc/ld.so.cache), nor at {}; install it with `pip install nvidia-cuda-nvrtc` \
         (or nvidia-cuda-nvrtc-cu12 for CUDA 12 drivers)",
        looked.join(", ")
    )))
}

/// NVRTC's files to try, those the driver can load the output of first: a cubin from an NVRTC
/// newer than the driver does not load.
fn nvrtc_candidates() -> Vec<PathBuf> {
    let roots = SEARCH_ROOTS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut wheels = PIP_NVRTC.to_vec();
    if let Some(driver) = driver_cuda_major() {
        wheels.sort_by_key(|&(_, _, major)| (major > driver, std::cmp::Reverse(major)));
    }
    let mut candidates: Vec<PathBuf> = roots
        .iter()
        .flat_map(|root| wheels.iter().map(move |(folder, file, _)| root.join(folder).join(file)))
        .collect();
    let toolkits = TOOLKIT_ENV.iter().filter_map(std::env::var_os).map(PathBuf::from);
    for toolkit in toolkits.chain([PathBuf::from(TOOLKIT_DEFAULT)]) {
        for (_, file, _) in &wheels {
            candidates.push(toolkit.join("lib64").join(file));
        }
    }
    candidates
}

/// The newest CUDA major version the driver supports (13 for a 580 driver), when there is one.
pub(crate) fn driver_cuda_major() -> Option<u32> {
    driver_version().ok().map(|(major, _)| major)
}

/// The newest CUDA (major, minor) version the driver supports.
fn driver_version() -> Result<(u32, u32)> {
    driver()?;
    let mut version = 0;
    // SAFETY: writes one int; callable before cuInit.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| Error::Cuda(format!("cuDriverGetVersion: {:?}", e.0)))?;
    let version = u32::try_from(version).unwrap_or(0);
    Ok((version / 1000, version % 1000 / 10))
}

/// The CUDA versions in play, for reports: what the driver supports, and the NVRTC that compiles
/// the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Versions {
    /// The newest CUDA (major, minor) the driver supports.
    pub driver: (u32, u32),
    /// The loaded NVRTC's (major, minor).
    pub nvrtc: (u32, u32),
}

/// The driver's and NVRTC's versions; an error when either library cannot be loaded.
pub fn versions() -> Result<Versions> {
    Ok(Versions { driver: driver_version()?, nvrtc: nvrtc_version()? })
}

/// The loaded NVRTC's (major, minor) version.
pub(crate) fn nvrtc_version() -> Result<(u32, u32)> {
    nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda(format!("NVRTC version: {:?}", e.0)))?;
    Ok((major.max(0) as u32, minor.max(0) as u32))
}

/// An error when NVRTC is newer than the driver, whose cubins the driver could not load.
pub(crate) fn check_versions(nvrtc: (u32, u32), driver_major: u32) -> Result<()> {
    if nvrtc.0 <= driver_major {
        return Ok(());
    }
    let wheel = match driver_major {
        12 => "nvidia-cuda-nvrtc-cu12".to_string(),
        _ => format!("an NVRTC of CUDA {driver_major} or older"),
    };
    Err(Error::Cuda(format!(
        "NVRTC {}.{} was found, but this NVIDIA driver supports CUDA {driver_major} at most, and cannot load what \
         a newer NVRTC compiles: install {wheel} (or a newer driver)",
        nvrtc.0, nvrtc.1
    )))
}

/// Preloads NVRTC's builtins library from `nvrtc`'s folder first: NVRTC opens it by name when it
/// compiles, and the dynamic loader does not look in a pip wheel's folder.
fn preload_with_builtins(nvrtc: &Path) -> bool {
    let builtins = nvrtc.parent().and_then(|folder| std::fs::read_dir(folder).ok()).into_iter().flatten();
    for entry in builtins.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libnvrtc-builtins.so.") {
            // A failure shows as NVRTC's own error at compile time, which names the library.
            let _ = open_global(&entry.path());
        }
    }
    preload(nvrtc)
}

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`, kept open for the process's lifetime.
fn open_global(path: &Path) -> bool {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: NVIDIA's libraries' initializers only set up the library itself.
    match unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) } {
        Ok(library) => {
            // cudarc and NVRTC hold pointers into it.
            std::mem::forget(library);
            true
        }
        Err(_) => false,
    }
}

/// Loads `path` for the rest of the process with its symbols global, so that a later
/// `dlopen("libnvrtc.so.13")` by name matches it by its SONAME.
fn preload(path: &Path) -> bool {
    // SAFETY: only tries to dlopen NVRTC by its usual names, which now match the loaded one.
    open_global(path) && unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

#[cfg(test)]
mod tests {
    use super::check_versions;

    #[test]
    fn an_nvrtc_newer_than_the_driver_is_an_error_that_says_what_to_install() {
        assert!(check_versions((12, 8), 13).is_ok());
        assert!(check_versions((13, 0), 13).is_ok());
        let error = check_versions((13, 0), 12).unwrap_err().to_string();
        assert!(error.contains("NVRTC 13.0") && error.contains("CUDA 12") && error.contains("nvidia-cuda-nvrtc-cu12"));
    }
}
