//! c10d's NCCL process group, from `csrc/distributed_nccl.cpp`: a shared
//! library of its own, embedded in the binary by build.rs where CUDA's
//! headers were at hand, and loaded here once libtorch's CUDA half is (its
//! references resolve against that library's symbols). Its collectives are
//! the same [`Group`] calls as Gloo's.

use std::time::Duration;

use anyhow::Result;

use super::c10d::{Group, Store};

/// An NCCL group of `world_size` ranks that meet through `store`.
#[cfg(tch_cifar_nccl)]
pub fn group(store: &Store, rank: i64, world_size: i64, timeout: Duration) -> Result<Group> {
    use std::ffi::c_char;
    use std::io::Write;

    use anyhow::{anyhow, Context};

    static LIBRARY: &[u8] = include_bytes!(env!("TCH_CIFAR_NCCL_LIB"));
    type NewGroup = unsafe extern "C" fn(
        *mut super::c10d::CStore,
        i32,
        i32,
        i64,
        *mut *mut super::c10d::CGroup,
    ) -> *mut c_char;

    crate::util::device::cuda_support()
        .map_err(|reason| anyhow!("NCCL needs libtorch's CUDA library: {reason}"))?;
    // dlopen takes a file: a private copy, removed once it is mapped.
    let mut file = tempfile::Builder::new()
        .prefix("tch-cifar-nccl-")
        .suffix(".so")
        .tempfile()
        .context("cannot write the NCCL library to a temporary file")?;
    file.write_all(LIBRARY)
        .and_then(|()| file.flush())
        .context("cannot write the NCCL library to a temporary file")?;
    let path = std::ffi::CString::new(file.path().as_os_str().as_encoded_bytes())
        .context("the temporary file's name holds a NUL byte")?;
    // SAFETY: a valid C string; the library is never closed, so the
    // function pointer below stays valid for the process's life.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a C string valid until the next call.
        let reason = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "dlopen failed".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        anyhow::bail!("cannot load tch-cifar's NCCL library: {reason}");
    }
    // SAFETY: a symbol the library defines, with this signature
    // (csrc/distributed_nccl.cpp).
    let new_group: NewGroup = unsafe {
        let symbol = libc::dlsym(handle, c"tch_cifar_group_new_nccl".as_ptr());
        anyhow::ensure!(
            !symbol.is_null(),
            "tch-cifar's NCCL library lacks its entry point"
        );
        std::mem::transmute::<*mut libc::c_void, NewGroup>(symbol)
    };
    // SAFETY: the store outlives the call; the group is written on success.
    unsafe {
        Group::from_new(|out| {
            new_group(
                store.as_ptr(),
                rank as i32,
                world_size as i32,
                super::c10d::millis(timeout),
                out,
            )
        })
    }
}

/// Without CUDA's headers at build time there is no NCCL library.
#[cfg(not(tch_cifar_nccl))]
pub fn group(_: &Store, _: i64, _: i64, _: Duration) -> Result<Group> {
    anyhow::bail!(
        "this tch-cifar was built without NCCL (its libtorch had no CUDA headers beside it): \
         build it with scripts/setup-libtorch's PyTorch wheel, or use --dist-backend gloo"
    )
}
