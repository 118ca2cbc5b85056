//! torch's global random generator, shared safely: every draw of this
//! crate goes through [`with_torch_rng`].

/// Runs `draw` with torch's global random generator to itself, seeded
/// first if `seed` is given. The generator is one for the whole process, so
/// any thread that draws from it while another seeds and draws would change
/// the other's numbers; every draw in this crate and its tests goes through
/// here.
pub fn with_torch_rng<T>(seed: Option<u64>, draw: impl FnOnce() -> T) -> T {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(seed) = seed {
        tch::manual_seed(seed as i64);
    }
    draw()
}
