//! Safe handles on libtorch's c10d (`csrc/distributed.cpp`): a TCPStore
//! client or server, and a process group's backend with the collectives
//! that data-parallel training uses. Every C++ error comes back as an
//! [`anyhow::Error`] with c10d's message.

use std::ffi::{c_char, CStr, CString};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::Tensor;

/// `TchCifarStore` (csrc/distributed.h).
#[repr(C)]
pub(super) struct CStore {
    _private: [u8; 0],
}

/// `TchCifarGroup` (csrc/distributed.h).
#[repr(C)]
pub(super) struct CGroup {
    _private: [u8; 0],
}

extern "C" {
    fn tch_cifar_store_new(
        host: *const c_char,
        port: u16,
        world_size: i64,
        is_server: bool,
        timeout_ms: i64,
        prefix: *const c_char,
        out: *mut *mut CStore,
    ) -> *mut c_char;
    fn tch_cifar_store_set(
        store: *mut CStore,
        key: *const c_char,
        value: *const u8,
        len: usize,
    ) -> *mut c_char;
    fn tch_cifar_store_try_get(
        store: *mut CStore,
        key: *const c_char,
        found: *mut bool,
        value: *mut *mut u8,
        len: *mut usize,
    ) -> *mut c_char;
    fn tch_cifar_store_get(
        store: *mut CStore,
        key: *const c_char,
        value: *mut *mut u8,
        len: *mut usize,
    ) -> *mut c_char;
    fn tch_cifar_store_free(store: *mut CStore);
    fn tch_cifar_group_new_gloo(
        store: *mut CStore,
        rank: i32,
        world_size: i32,
        timeout_ms: i64,
        hostname: *const c_char,
        interfaces: *const c_char,
        out: *mut *mut CGroup,
    ) -> *mut c_char;
    fn tch_cifar_group_all_reduce_sum(
        group: *mut CGroup,
        tensor: *const torch_sys::C_tensor,
    ) -> *mut c_char;
    fn tch_cifar_group_broadcast(
        group: *mut CGroup,
        tensor: *const torch_sys::C_tensor,
        root: i64,
    ) -> *mut c_char;
    fn tch_cifar_group_free(group: *mut CGroup);
    fn tch_cifar_quiet_cpp_logs();
    // csrc/script_module.cpp: frees what the functions above malloc.
    fn tch_cifar_free_message(message: *mut c_char);
}

/// Silences libtorch's own C++ log lines: c10d logs each failed connection
/// with a C++ backtrace, and every error also comes back as a message.
pub fn quiet_cpp_logs() {
    // SAFETY: sets one int of libtorch's logging.
    unsafe { tch_cifar_quiet_cpp_logs() }
}

/// Turns a returned message (NULL on success) into a result.
///
/// # Safety
/// `message` is NULL or a malloc'ed C string that nothing else frees.
unsafe fn checked(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    let text = CStr::from_ptr(message).to_string_lossy().trim().to_string();
    tch_cifar_free_message(message);
    bail!("{text}")
}

fn c_string(text: &str) -> Result<CString> {
    CString::new(text).with_context(|| format!("{text:?} holds a NUL byte"))
}

/// The `len` bytes at `value`, which the C++ side malloc'ed, freed here.
///
/// # Safety
/// `value` points at `len` readable bytes from malloc that nothing else frees.
unsafe fn take_bytes(value: *mut u8, len: usize) -> Vec<u8> {
    let bytes = std::slice::from_raw_parts(value, len).to_vec();
    tch_cifar_free_message(value.cast());
    bytes
}

pub(super) fn millis(timeout: Duration) -> i64 {
    timeout.as_millis().min(i64::MAX as u128) as i64
}

/// A connection to a c10d `TCPStore` (the server too, with `is_server`),
/// maybe behind a key prefix.
pub struct Store {
    ptr: *mut CStore,
}

// SAFETY: c10d's TCPStore client serializes its operations under a mutex
// of its own, so one handle may be used from any thread.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// Connects to the store at `host:port`, hosting it when `is_server`,
    /// and waits up to `timeout` for it (and for each later operation).
    pub fn connect(
        host: &str,
        port: u16,
        world_size: i64,
        is_server: bool,
        timeout: Duration,
        prefix: &str,
    ) -> Result<Store> {
        let host = c_string(host)?;
        let prefix = c_string(prefix)?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: the strings outlive the call; `ptr` is written on success.
        unsafe {
            checked(tch_cifar_store_new(
                host.as_ptr(),
                port,
                world_size,
                is_server,
                millis(timeout),
                prefix.as_ptr(),
                &mut ptr,
            ))?;
        }
        Ok(Store { ptr })
    }

    pub(super) fn as_ptr(&self) -> *mut CStore {
        self.ptr
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let key = c_string(key)?;
        // SAFETY: the key and value outlive the call, which copies them.
        unsafe {
            checked(tch_cifar_store_set(
                self.ptr,
                key.as_ptr(),
                value.as_ptr(),
                value.len(),
            ))
        }
    }

    /// The value of `key`, waiting for some rank to set it (up to the
    /// store's timeout).
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let key = c_string(key)?;
        let mut value = std::ptr::null_mut();
        let mut len = 0;
        // SAFETY: the out-pointers are valid; the value is malloc'ed by the
        // C++ side and freed here with its own function.
        unsafe {
            checked(tch_cifar_store_get(
                self.ptr,
                key.as_ptr(),
                &mut value,
                &mut len,
            ))?;
            Ok(take_bytes(value, len))
        }
    }

    /// The value of `key`, or `None` while nobody has set it.
    pub fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = c_string(key)?;
        let mut found = false;
        let mut value = std::ptr::null_mut();
        let mut len = 0;
        // SAFETY: the out-pointers are valid; the value is malloc'ed by the
        // C++ side and freed here with its own function.
        unsafe {
            checked(tch_cifar_store_try_get(
                self.ptr,
                key.as_ptr(),
                &mut found,
                &mut value,
                &mut len,
            ))?;
            if !found {
                return Ok(None);
            }
            Ok(Some(take_bytes(value, len)))
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from tch_cifar_store_new and is freed once.
        unsafe { tch_cifar_store_free(self.ptr) }
    }
}

/// A c10d process group's backend (ProcessGroupGloo), whose collectives
/// every rank calls in the same order.
pub struct Group {
    ptr: *mut CGroup,
}

// SAFETY: the backend is only used from one thread at a time (the training
// thread); c10d's backends may be handed between threads.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Group {
    /// A Gloo group of `world_size` ranks that meet through `store`. Its
    /// sockets bind to `hostname`, else to each of the comma-separated
    /// network `interfaces`, else where c10d binds them for PyTorch.
    pub fn gloo(
        store: &Store,
        rank: i64,
        world_size: i64,
        timeout: Duration,
        hostname: Option<&str>,
        interfaces: Option<&str>,
    ) -> Result<Group> {
        let hostname = hostname.map(c_string).transpose()?;
        let interfaces = interfaces.map(c_string).transpose()?;
        // SAFETY: the store and the strings outlive the call.
        unsafe {
            Group::from_new(|out| {
                tch_cifar_group_new_gloo(
                    store.ptr,
                    rank as i32,
                    world_size as i32,
                    millis(timeout),
                    hostname.as_ref().map_or(std::ptr::null(), |h| h.as_ptr()),
                    interfaces.as_ref().map_or(std::ptr::null(), |i| i.as_ptr()),
                    out,
                )
            })
        }
    }

    /// The group that `new` makes: it writes the group on success and
    /// returns NULL, or returns an error message.
    ///
    /// # Safety
    /// `new` is one of csrc/'s group constructors, called with valid arguments.
    pub(super) unsafe fn from_new(
        new: impl FnOnce(*mut *mut CGroup) -> *mut c_char,
    ) -> Result<Group> {
        let mut ptr = std::ptr::null_mut();
        checked(new(&mut ptr))?;
        Ok(Group { ptr })
    }

    /// Sums `tensor` over every rank, in place.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()> {
        // SAFETY: the tensor outlives the call, which waits for the result.
        unsafe { checked(tch_cifar_group_all_reduce_sum(self.ptr, tensor.as_ptr())) }
    }

    /// Overwrites `tensor` with rank `root`'s.
    pub fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<()> {
        // SAFETY: the tensor outlives the call, which waits for the result.
        unsafe { checked(tch_cifar_group_broadcast(self.ptr, tensor.as_ptr(), root)) }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from a group constructor and is freed once.
        unsafe { tch_cifar_group_free(self.ptr) }
    }
}
