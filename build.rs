//! Link flags that tch programs need but torch-sys cannot set for them.
//!
//! * An rpath to the libtorch the build used, so the binary and the tests run
//!   without `LD_LIBRARY_PATH`. `dlopen` finds `libtorch_cuda.so` by it too:
//!   that library is not linked: `device::cuda_support` loads it when a
//!   command asks for CUDA, which keeps its 350 MB out of CPU runs.
//! * `csrc/`, compiled against the same libtorch's headers: the
//!   `torch.backends.mkldnn.enabled` switch (`aten_context.cpp`) and the
//!   TorchScript module `export` writes (`script_module.cpp`), neither of
//!   which tch binds.

use std::path::Path;

/// This project's own C++, compiled into one static library.
const SOURCES: [&str; 2] = ["csrc/aten_context.cpp", "csrc/script_module.cpp"];

fn main() {
    // Set by torch-sys (`links = "tch"`, key `libtorch_lib`).
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    for file in SOURCES {
        println!("cargo:rerun-if-changed={file}");
    }
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report its libtorch lib dir (DEP_TCH_LIBTORCH_LIB)");
    let lib = Path::new(&lib);
    let lib = lib.canonicalize().unwrap_or_else(|_| lib.to_path_buf());
    // Both a libtorch download and the PyTorch wheel put `include/` next to `lib/`.
    let include = lib.with_file_name("include");
    assert!(
        include.join("ATen/Context.h").is_file(),
        "no ATen/Context.h under {}: the libtorch at {} lacks its C++ headers",
        include.display(),
        lib.display()
    );
    // script_module.cpp passes std::string to libtorch, so it must use the
    // C++ ABI libtorch was built with; torch-sys reads the same variable.
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .files(SOURCES)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi.as_str())
        .warnings(false)
        .compile("tch_cifar_csrc");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
