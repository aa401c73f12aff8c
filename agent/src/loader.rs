//! Loading, attaching, pinning and detaching the data-path programs: the XDP decision program
//! (`redirect`) and the TC rewriter (`rewrite`, on TCX ingress), on every managed interface.
//!
//! Layout under bpffs (`<root>` is `/sys/fs/bpf/mirage` unless `--bpffs-root` says otherwise):
//!
//! ```text
//! <root>/v<LAYOUT_VERSION>/<MAP NAME>      every map, pinned by name
//! <root>/v<LAYOUT_VERSION>/link-xdp-<if>   the XDP link on interface <if>
//! <root>/v<LAYOUT_VERSION>/link-tc-<if>    the TCX ingress link on interface <if>
//! ```
//!
//! A restarted (or upgraded, same layout) agent loads the new programs with the pinned maps
//! reused, then swaps them into the pinned links with `bpf_link_update`: the interface is never
//! without a program, and the attacker and flow state is never empty. The pins keep the programs
//! enforcing while no agent runs at all.
//!
//! Both links are BPF links (XDP link, TCX link), so taking over works the same way for both. A
//! pinned link whose interface has gone (deleted, or deleted and re-created under the same name)
//! is defunct: `bpf_link_update` fails with `ENOLINK`; the agent then drops that pin and attaches
//! anew.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use agent_common::{LAYOUT_VERSION, maps as names, programs};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, MapError, RingBuf},
    programs::{
        LinkOrder, Program, ProgramError, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
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
    /// The object has no program of that name (or of that type).
    #[error("the eBPF object has no {kind} program `{name}`")]
    MissingProgram {
        /// The program name.
        name: &'static str,
        /// `XDP` or `TC`.
        kind: &'static str,
    },
    /// The program could not be verified and loaded.
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
    /// The TC program could not be attached.
    #[error("attaching TC (TCX ingress) to {iface}; TCX links need Linux 6.6 or later")]
    TcAttach {
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// The flow-event ring buffer is missing or could not be mapped.
    #[error("opening the {name} ring buffer")]
    RingBuf {
        /// The map name.
        name: &'static str,
        /// The cause.
        #[source]
        source: MapError,
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

/// Prefix of the XDP link pins.
const XDP_LINK_PREFIX: &str = "link-xdp-";
/// Prefix of the TC link pins.
const TC_LINK_PREFIX: &str = "link-tc-";

/// The pin path of the XDP link on `iface`.
pub fn link_pin(root: &Path, iface: &str) -> PathBuf {
    pin_dir(root).join(format!("{XDP_LINK_PREFIX}{iface}"))
}

/// The pin path of the TC (TCX ingress) link on `iface`.
pub fn tc_link_pin(root: &Path, iface: &str) -> PathBuf {
    pin_dir(root).join(format!("{TC_LINK_PREFIX}{iface}"))
}

/// Interfaces with a pinned link, as `(iface, is_tc)`, sorted.
pub fn pinned_links(root: &Path) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = std::fs::read_dir(pin_dir(root))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(i) = name.strip_prefix(XDP_LINK_PREFIX) {
                Some((i.to_owned(), false))
            } else {
                name.strip_prefix(TC_LINK_PREFIX)
                    .map(|i| (i.to_owned(), true))
            }
        })
        .collect();
    out.sort();
    out
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

/// A program of the object, by name and type, without loading it.
pub fn program_mut<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    kind: &'static str,
) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoaderError::MissingProgram { name, kind })?
        .try_into()
        .map_err(|_| LoaderError::MissingProgram { name, kind })
}

fn load_err(name: &'static str) -> impl FnOnce(ProgramError) -> LoaderError {
    move |source| LoaderError::Program {
        name,
        source: Box::new(source),
    }
}

/// Loads (verifies) an XDP program of the object and returns it.
pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = program_mut(ebpf, name, "XDP")?;
    prog.load().map_err(load_err(name))?;
    Ok(prog)
}

/// Loads (verifies) a TC (sched_cls) program of the object and returns it. An object built
/// without it gives [`LoaderError::MissingProgram`].
pub fn tc_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    let prog: &mut SchedClassifier = program_mut(ebpf, name, "TC")?;
    prog.load().map_err(load_err(name))?;
    Ok(prog)
}

/// Takes the flow-event ring buffer out of a loaded object. Only `run` does: a ring buffer has
/// one consumer.
pub fn take_flow_events(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>> {
    let name = names::FLOW_EVENTS;
    let map = ebpf.take_map(name).ok_or(LoaderError::RingBuf {
        name,
        source: MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    RingBuf::try_from(map).map_err(|source| LoaderError::RingBuf { name, source })
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
    /// (TC) Attached as a TCX ingress link.
    Tcx,
}

/// Whether a link update failed because the link is defunct (its interface is gone).
fn is_defunct(e: &ProgramError) -> bool {
    matches!(e, ProgramError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOLINK))
}

fn link_error(
    op: &'static str,
    path: &Path,
    source: impl std::error::Error + Send + Sync + 'static,
) -> LoaderError {
    LoaderError::Link {
        op,
        path: path.to_owned(),
        source: Box::new(source),
    }
}

/// Opens the link pinned at `pin`, if there is one.
fn open_pinned_link(pin: &Path) -> Result<Option<FdLink>> {
    if !pin.exists() {
        return Ok(None);
    }
    let pinned = PinnedLink::from_pin(pin).map_err(|e| link_error("opening", pin, e))?;
    Ok(Some(pinned.into()))
}

/// Removes the pin of a defunct link so that a fresh one can take its place.
fn drop_defunct_pin(pin: &Path, iface: &str, what: &str) -> Result<()> {
    warn!(
        iface,
        pin = %pin.display(),
        "The pinned {what} link is defunct (its interface was removed); attaching anew."
    );
    std::fs::remove_file(pin).map_err(|source| LoaderError::Fs {
        op: "removing",
        path: pin.to_owned(),
        source,
    })
}

/// Attaches `prog` to `iface`: takes over the pinned link if there is one, otherwise attaches
/// anew and pins the link.
pub fn attach(prog: &mut Xdp, root: &Path, iface: &str, mode: XdpModeName) -> Result<Attached> {
    let pin = link_pin(root, iface);
    if let Some(fd_link) = open_pinned_link(&pin)? {
        let xdp_link = XdpLink::try_from(fd_link).map_err(|e| link_error("reading", &pin, e))?;
        // bpf_link_update: the kernel swaps the program in the live link atomically.
        match prog.attach_to_link(xdp_link) {
            Ok(_) => {
                info!(iface, pin = %pin.display(), "Took over the pinned XDP link; no gap in enforcement.");
                return Ok(Attached::TookOver);
            }
            Err(e) if is_defunct(&e) => drop_defunct_pin(&pin, iface, "XDP")?,
            Err(e) => return Err(link_error("updating", &pin, e)),
        }
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

/// Attaches the TC rewriter to `iface` on TCX ingress: takes over the pinned link if there is
/// one, otherwise attaches anew (after any TCX program already there) and pins the link.
///
/// TCX links need no `clsact` qdisc (Linux 6.6+). The netlink (`cls_bpf`) fallback of older
/// kernels is not used: its attachment cannot be pinned, so a restart would open a gap.
pub fn attach_tc(prog: &mut SchedClassifier, root: &Path, iface: &str) -> Result<Attached> {
    let pin = tc_link_pin(root, iface);
    if let Some(fd_link) = open_pinned_link(&pin)? {
        let link =
            SchedClassifierLink::try_from(fd_link).map_err(|e| link_error("reading", &pin, e))?;
        match prog.attach_to_link(link) {
            Ok(_) => {
                info!(iface, pin = %pin.display(), "Took over the pinned TC link; no gap in rewriting.");
                return Ok(Attached::TookOver);
            }
            Err(e) if is_defunct(&e) => drop_defunct_pin(&pin, iface, "TC")?,
            Err(e) => return Err(link_error("updating", &pin, e)),
        }
    }
    let link_id = prog
        .attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| LoaderError::TcAttach {
            iface: iface.to_owned(),
            source: Box::new(e),
        })?;
    let link = prog
        .take_link(link_id)
        .map_err(|e| link_error("taking", &pin, e))?;
    let fd_link = FdLink::try_from(link).map_err(|e| link_error("converting", &pin, e))?;
    // Pinning keeps the link (and so the program) alive after this process exits.
    fd_link
        .pin(&pin)
        .map_err(|e| link_error("pinning", &pin, e))?;
    info!(iface, pin = %pin.display(), "Attached and pinned the TC (TCX ingress) link.");
    Ok(Attached::Tcx)
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

/// Removes the programs (XDP and TC) from every interface they are pinned on, then the pinned
/// maps. Returns the interfaces detached.
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
        let (iface, what) = if let Some(i) = name.strip_prefix(XDP_LINK_PREFIX) {
            (i, "XDP")
        } else if let Some(i) = name.strip_prefix(TC_LINK_PREFIX) {
            (i, "TC")
        } else {
            continue;
        };
        // Unpinning drops the last reference once our fd closes: the kernel detaches.
        let pinned = PinnedLink::from_pin(&path).map_err(|e| link_error("opening", &path, e))?;
        let fd = pinned.unpin().map_err(|source| LoaderError::Fs {
            op: "unpinning",
            path: path.clone(),
            source,
        })?;
        drop(fd);
        info!(iface, "Detached {what}.");
        if !detached.iter().any(|d| d == iface) {
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

/// The name of the TC rewriter, re-exported for callers that load it by hand.
pub const TC_PROGRAM: &str = programs::TC;
