//! Loading, attaching, pinning and detaching the XDP program.
//!
//! Layout under bpffs (`<root>` is `/sys/fs/bpf/mirage` unless `--bpffs-root` says otherwise):
//!
//! ```text
//! <root>/v<LAYOUT_VERSION>/<MAP NAME>      every map, pinned by name
//! <root>/v<LAYOUT_VERSION>/link-xdp-<if>   the XDP link on interface <if>
//! ```
//!
//! A restarted (or upgraded, same layout) agent loads the new program with the pinned maps
//! reused, then swaps it into the pinned link with `bpf_link_update`: the interface is never
//! without a program, and the attacker state is never empty. The pins keep the program enforcing
//! while no agent runs at all.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use agent_common::{LAYOUT_VERSION, maps as names, programs};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{
        ProgramError, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpMode},
    },
};
use tracing::{info, warn};

use crate::{config::XdpModeName, maps::Maps};

/// The eBPF object, built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mirage"));

/// bpffs magic number (`BPF_FS_MAGIC` in include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Errors of the loader.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// bpffs is not mounted and could not be mounted.
    #[error(
        "bpffs is not mounted at {path} and mounting it failed; run `mount -t bpf bpf /sys/fs/bpf`"
    )]
    Bpffs {
        /// Where bpffs was expected.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A directory under bpffs could not be created or removed.
    #[error("{op} {path}")]
    Fs {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The object could not be loaded.
    #[error("loading the eBPF object (maps pinned under {pin_dir})")]
    Load {
        /// The pin directory used.
        pin_dir: PathBuf,
        /// The cause.
        #[source]
        source: Box<EbpfError>,
    },
    /// The program is missing or could not be verified and loaded.
    #[error("loading program {name}; set RUST_LOG=debug for the verifier log")]
    Program {
        /// The program name.
        name: &'static str,
        /// The cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// The program could not be attached.
    #[error("attaching XDP to {iface} in {mode} mode; try `--xdp-mode generic`")]
    Attach {
        /// The interface.
        iface: String,
        /// The mode tried last.
        mode: &'static str,
        /// The cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// The pinned link could not be taken over or created.
    #[error("{op} the pinned link {path}")]
    Link {
        /// What was being done.
        op: &'static str,
        /// The pin path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The maps could not be wrapped.
    #[error(transparent)]
    Maps(#[from] crate::maps::MapsError),
}

type Result<T> = std::result::Result<T, LoaderError>;

/// The versioned pin directory under `root`.
pub fn pin_dir(root: &Path) -> PathBuf {
    root.join(format!("v{LAYOUT_VERSION}"))
}

/// The pin path of the XDP link on `iface`.
pub fn link_pin(root: &Path, iface: &str) -> PathBuf {
    pin_dir(root).join(format!("link-xdp-{iface}"))
}

/// Makes sure bpffs is mounted at the mount point that holds `root` (`/sys/fs/bpf`), mounting
/// it if not.
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    let mount_point = Path::new("/sys/fs/bpf");
    if !root.starts_with(mount_point) || is_bpffs(mount_point) {
        return Ok(());
    }
    info!(path = %mount_point.display(), "Mounting bpffs.");
    let err = |source| LoaderError::Bpffs {
        path: mount_point.to_owned(),
        source,
    };
    let target = CString::new("/sys/fs/bpf").map_err(|e| err(io::Error::other(e)))?;
    let fstype = CString::new("bpf").map_err(|e| err(io::Error::other(e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid path string and `st` a writable statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Loads the object with its maps pinned (or reused) under `pin_dir`.
pub fn load(pin_dir: &Path) -> Result<Ebpf> {
    std::fs::create_dir_all(pin_dir).map_err(|source| LoaderError::Fs {
        op: "creating",
        path: pin_dir.to_owned(),
        source,
    })?;
    EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(EBPF_OBJECT)
        .map_err(|source| LoaderError::Load {
            pin_dir: pin_dir.to_owned(),
            source: Box::new(source),
        })
}

/// Loads (verifies) a program of the object and returns it.
pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    let prog_err = |source: ProgramError| LoaderError::Program {
        name,
        source: Box::new(source),
    };
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| {
            prog_err(ProgramError::InvalidName {
                name: name.to_owned(),
            })
        })?
        .try_into()
        .map_err(prog_err)?;
    prog.load().map_err(prog_err)?;
    Ok(prog)
}

/// Takes the maps out of a loaded object.
pub fn take_maps(ebpf: &mut Ebpf) -> Result<Maps> {
    Ok(Maps::from_maps(|name| ebpf.take_map(name))?)
}

/// How the program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A pinned link existed and now runs the new program (no gap).
    TookOver,
    /// Attached in native (driver) mode.
    Native,
    /// Attached in generic (SKB) mode.
    Generic,
}

/// Attaches `prog` to `iface`: takes over the pinned link if there is one, otherwise attaches
/// anew and pins the link.
pub fn attach(prog: &mut Xdp, root: &Path, iface: &str, mode: XdpModeName) -> Result<Attached> {
    let pin = link_pin(root, iface);
    if pin.exists() {
        let link_err = |op, source: Box<dyn std::error::Error + Send + Sync>| LoaderError::Link {
            op,
            path: pin.clone(),
            source,
        };
        let pinned = PinnedLink::from_pin(&pin).map_err(|e| link_err("opening", Box::new(e)))?;
        let fd_link: FdLink = pinned.into();
        let xdp_link =
            XdpLink::try_from(fd_link).map_err(|e: LinkError| link_err("reading", Box::new(e)))?;
        // bpf_link_update: the kernel swaps the program in the live link atomically.
        prog.attach_to_link(xdp_link)
            .map_err(|e| link_err("updating", Box::new(e)))?;
        info!(iface, pin = %pin.display(), "Took over the pinned XDP link; no gap in enforcement.");
        return Ok(Attached::TookOver);
    }

    let attach_err = |mode: &'static str, source: ProgramError| LoaderError::Attach {
        iface: iface.to_owned(),
        mode,
        source: Box::new(source),
    };
    let (link_id, attached) = match mode {
        XdpModeName::Native => (
            prog.attach(iface, XdpMode::Driver)
                .map_err(|e| attach_err("native", e))?,
            Attached::Native,
        ),
        XdpModeName::Generic => (
            prog.attach(iface, XdpMode::Skb)
                .map_err(|e| attach_err("generic", e))?,
            Attached::Generic,
        ),
        XdpModeName::Auto if driver_name(iface).is_ok_and(|d| d == "veth") => {
            info!(
                iface,
                "Interface is a veth: using generic (SKB) mode, which is faster there (native \
                 mode copies every skb into an XDP buffer) and can forward into a peer that runs \
                 no XDP program."
            );
            (
                prog.attach(iface, XdpMode::Skb)
                    .map_err(|e| attach_err("generic", e))?,
                Attached::Generic,
            )
        }
        XdpModeName::Auto => match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => (id, Attached::Native),
            Err(err) => {
                warn!(iface, error = %err, "Native XDP attach failed, using generic (SKB) mode.");
                (
                    prog.attach(iface, XdpMode::Skb)
                        .map_err(|e| attach_err("generic", e))?,
                    Attached::Generic,
                )
            }
        },
    };
    let link = prog.take_link(link_id).map_err(|e| LoaderError::Link {
        op: "taking",
        path: pin.clone(),
        source: Box::new(e),
    })?;
    let fd_link = FdLink::try_from(link).map_err(|e| LoaderError::Link {
        op: "converting (the kernel gave a netlink attachment, which cannot be pinned)",
        path: pin.clone(),
        source: Box::new(e),
    })?;
    // Pinning keeps the link (and so the program) alive after this process exits.
    fd_link.pin(&pin).map_err(|e| LoaderError::Link {
        op: "pinning",
        path: pin.clone(),
        source: Box::new(e),
    })?;
    info!(iface, pin = %pin.display(), mode = ?attached, "Attached and pinned the XDP link.");
    Ok(attached)
}

/// The kernel driver behind `iface` (`ETHTOOL_GDRVINFO`), e.g. `veth`, `mlx5_core`.
pub fn driver_name(iface: &str) -> io::Result<String> {
    /// `struct ethtool_drvinfo` from include/uapi/linux/ethtool.h.
    #[repr(C)]
    struct EthtoolDrvinfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    let name = iface.as_bytes();
    // SAFETY: both structs are plain C data for which all-zero is a valid value.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: a plain socket call; the fd is closed by OwnedFd below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at a live ethtool_drvinfo.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCETHTOOL,
            &mut ifr,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Removes the program from every interface it is pinned on, then the pinned maps. Returns the
/// interfaces detached.
pub fn detach(root: &Path) -> Result<Vec<String>> {
    let dir = pin_dir(root);
    let mut detached = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(detached),
        Err(source) => {
            return Err(LoaderError::Fs {
                op: "reading",
                path: dir,
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(iface) = name.strip_prefix("link-xdp-") {
            // Unpinning drops the last reference once our fd closes: the kernel detaches.
            let pinned = PinnedLink::from_pin(&path).map_err(|e| LoaderError::Link {
                op: "opening",
                path: path.clone(),
                source: Box::new(e),
            })?;
            let fd = pinned.unpin().map_err(|source| LoaderError::Fs {
                op: "unpinning",
                path: path.clone(),
                source,
            })?;
            drop(fd);
            info!(iface, "Detached XDP.");
            detached.push(iface.to_owned());
        }
    }
    for name in names::PINNED {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LoaderError::Fs {
                    op: "unpinning",
                    path,
                    source,
                });
            }
        }
    }
    remove_dir_if_empty(&dir)?;
    remove_dir_if_empty(root)?;
    Ok(detached)
}

fn remove_dir_if_empty(dir: &Path) -> Result<()> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Ok(())
        }
        Err(source) => Err(LoaderError::Fs {
            op: "removing",
            path: dir.to_owned(),
            source,
        }),
    }
}

/// The name of the XDP entry, re-exported for callers that load it by hand.
pub const XDP_PROGRAM: &str = programs::XDP;
