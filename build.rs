//! Link flags that tch programs need but torch-sys cannot set for them.
//!
//! * An rpath to the libtorch the build used, so the binary and the tests run
//!   without `LD_LIBRARY_PATH`.
//! * `libtorch_cuda.so` linked with `--no-as-needed`: nothing in our code
//!   references its symbols, so the default `--as-needed` would drop it and
//!   `tch::Cuda::is_available()` would be false even on a GPU machine.

use std::path::Path;

fn main() {
    // Set by torch-sys (`links = "tch"`, key `libtorch_lib`).
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report its libtorch lib dir; no rpath set");
        return;
    };
    let lib = Path::new(&lib);
    let lib = lib.canonicalize().unwrap_or_else(|_| lib.to_path_buf());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
