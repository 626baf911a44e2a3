//! Whether AVX-512 BF16's `vdpbf16ps` is fast on this CPU, measured once per process.
//!
//! `vdpbf16ps` does two multiply-adds per f32 lane, so a bf16 product beats an f32 one only
//! where the instruction issues at least about half as often as an f32 FMA. That holds on
//! AMD Zen 4 (both one 512-bit instruction per cycle), not on Intel's Sapphire/Emerald
//! Rapids cores, where it takes about four times an FMA's issue slot: there bf16 on AVX-512
//! runs at half the f32 speed. Those cores have AMX, which is the fast bf16 path, but a
//! hypervisor may hide AMX from the guest (CPUID without it): the CPU model or the AMX bit
//! cannot tell, so [`DotSpeed::measure`] times the two instructions.
//!
//! The measurement: 2 ms of f32 FMAs first (the first 512-bit multiply-adds after a pause
//! can run at a fraction of their speed while the core settles), then 12 independent
//! accumulator chains (more than latency × ports on any current core) of 2,048 instructions
//! each, register-only, alternating the two instructions over 15 trials and keeping each
//! one's fastest (about 2.5 ms in all; the fastest trial is the one no interrupt, frequency
//! change or busy sibling hyperthread disturbed). The inputs are zeros, so there are no
//! denormal assists.

use std::sync::OnceLock;
use std::time::Duration;

/// `vdpbf16ps` time per instruction over an f32 FMA's, at or above which the AVX-512 bf16
/// kernels are not used by choice (`auto`, attention): bf16 then does at most 2 / 1.5 = 1.33×
/// the multiply-adds of f32 per unit of time, before its conversions.
pub(crate) const SLOW_RATIO: f64 = 1.5;

/// The measured issue cost of `vdpbf16ps` against `vfmadd231ps` (512-bit forms).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct DotSpeed {
    /// Time of one `vdpbf16ps` over the time of one f32 FMA, throughput-bound.
    pub ratio: f64,
}

impl DotSpeed {
    /// The measurement of this process (made on first use, then cached); `None` where the
    /// CPU has no AVX-512 BF16. `RAG_INGEST_BF16_SPEED=fast|slow` replaces the measurement
    /// (ratio 1 or 4) to test either decision on any such CPU.
    pub(crate) fn get() -> Option<Self> {
        static SPEED: OnceLock<Option<DotSpeed>> = OnceLock::new();
        *SPEED.get_or_init(|| {
            super::bf16::missing_features()
                .is_none()
                .then(|| match std::env::var("RAG_INGEST_BF16_SPEED").as_deref() {
                    Ok("fast") => Some(Self { ratio: 1.0 }),
                    Ok("slow") => Some(Self { ratio: 4.0 }),
                    _ => Self::measure(),
                })
                .flatten()
        })
    }

    /// Whether bf16 products on AVX-512 pay here (`ratio` below [`SLOW_RATIO`]).
    pub(crate) fn pays(self) -> bool {
        self.ratio < SLOW_RATIO
    }

    /// Whether this process's measurement says bf16 products on AVX-512 pay (`false` without
    /// AVX-512 BF16).
    pub(crate) fn fast() -> bool {
        Self::get().is_some_and(Self::pays)
    }

    /// Times both instructions (see the module doc); `None` where the CPU lacks AVX-512 BF16
    /// or the timer did not advance.
    fn measure() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if super::bf16::missing_features().is_some() {
                return None;
            }
            // SAFETY: AVX-512F and AVX-512 BF16 were detected just above.
            unsafe { ratio_to_fma(x86::dot_chains) }.map(|ratio| Self { ratio })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }
}

/// Alternating trials of each instruction, after the warm-up.
const TRIALS: usize = 15;

/// How long f32 FMAs run before the trials: the first 512-bit multiply-adds after a
/// pause ran at up to 3x their time for tens of microseconds on an Intel Cascade Lake
/// (measured: the trials of one instruction or the other slow at random, the ratio 0.7 to
/// 1.5 for instructions of equal speed), while the core's vector units and clock settle.
const WARM_UP: Duration = Duration::from_millis(2);

/// Time of `chains` over [`x86::fma_chains`], fastest of [`TRIALS`] alternating trials
/// each, after [`WARM_UP`]; `None` if the timer did not advance.
///
/// # Safety
///
/// The CPU must run `chains`' instructions and AVX-512F.
#[cfg(target_arch = "x86_64")]
unsafe fn ratio_to_fma(chains: unsafe fn(usize)) -> Option<f64> {
    let (mut dot, mut fma) = (Duration::MAX, Duration::MAX);
    // SAFETY: the caller's (AVX-512F).
    unsafe { x86::warm_up(WARM_UP) };
    for _ in 0..TRIALS {
        // SAFETY: the caller's.
        unsafe {
            dot = dot.min(x86::time(chains));
            fma = fma.min(x86::time(x86::fma_chains));
        }
    }
    (!fma.is_zero()).then(|| dot.as_secs_f64() / fma.as_secs_f64())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::time::{Duration, Instant};

    /// Iterations of a loop of 12 instructions.
    const ITERATIONS: usize = 2048;

    /// How long `chains` takes (after one untimed run, which also wakes the 512-bit units).
    ///
    /// # Safety
    ///
    /// The CPU must run `chains`' instructions.
    pub(super) unsafe fn time(chains: unsafe fn(usize)) -> Duration {
        // SAFETY: the caller's.
        unsafe { chains(ITERATIONS) };
        let start = Instant::now();
        // SAFETY: the caller's.
        unsafe { chains(ITERATIONS) };
        start.elapsed()
    }

    /// Runs [`fma_chains`] for at least `duration`.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F.
    pub(super) unsafe fn warm_up(duration: Duration) {
        let start = Instant::now();
        while start.elapsed() < duration {
            // SAFETY: the caller's.
            unsafe { fma_chains(ITERATIONS) };
        }
    }

    /// Defines `$name(iterations)`: 12 independent `$op` chains (zmm0…zmm11 accumulating
    /// zmm12 × zmm12, all zeros), `iterations` deep.
    macro_rules! chains {
        ($(#[$doc:meta])* $name:ident, $features:literal, $op:literal) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(iterations: usize) {
                // SAFETY: registers only; the features are the caller's contract.
                unsafe {
                    asm!(
                        "vpxord zmm12, zmm12, zmm12",
                        "vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1",
                        "vpxord zmm2, zmm2, zmm2", "vpxord zmm3, zmm3, zmm3",
                        "vpxord zmm4, zmm4, zmm4", "vpxord zmm5, zmm5, zmm5",
                        "vpxord zmm6, zmm6, zmm6", "vpxord zmm7, zmm7, zmm7",
                        "vpxord zmm8, zmm8, zmm8", "vpxord zmm9, zmm9, zmm9",
                        "vpxord zmm10, zmm10, zmm10", "vpxord zmm11, zmm11, zmm11",
                        "2:",
                        concat!($op, " zmm0, zmm12, zmm12"),
                        concat!($op, " zmm1, zmm12, zmm12"),
                        concat!($op, " zmm2, zmm12, zmm12"),
                        concat!($op, " zmm3, zmm12, zmm12"),
                        concat!($op, " zmm4, zmm12, zmm12"),
                        concat!($op, " zmm5, zmm12, zmm12"),
                        concat!($op, " zmm6, zmm12, zmm12"),
                        concat!($op, " zmm7, zmm12, zmm12"),
                        concat!($op, " zmm8, zmm12, zmm12"),
                        concat!($op, " zmm9, zmm12, zmm12"),
                        concat!($op, " zmm10, zmm12, zmm12"),
                        concat!($op, " zmm11, zmm12, zmm12"),
                        "dec {n}",
                        "jnz 2b",
                        n = inout(reg) iterations.max(1) => _,
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                        out("zmm12") _,
                        options(nomem, nostack),
                    );
                }
            }
        };
    }

    chains!(
        /// 12 independent `vdpbf16ps` chains, `iterations` deep, on zeros.
        ///
        /// # Safety
        ///
        /// The CPU must have AVX-512F and AVX-512 BF16.
        dot_chains,
        "avx512f,avx512bf16",
        "vdpbf16ps"
    );

    chains!(
        /// 12 independent `vfmadd231ps` chains, `iterations` deep, on zeros.
        ///
        /// # Safety
        ///
        /// The CPU must have AVX-512F.
        fma_chains,
        "avx512f",
        "vfmadd231ps"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_finite_positive_ratio_where_the_cpu_has_bf16() {
        match DotSpeed::measure() {
            Some(speed) => assert!(
                speed.ratio.is_finite() && speed.ratio > 0.0,
                "ratio {}",
                speed.ratio
            ),
            None => assert!(super::super::bf16::missing_features().is_some()),
        }
    }

    #[test]
    fn the_threshold_separates_pays_from_not() {
        assert!(DotSpeed { ratio: 1.0 }.pays());
        assert!(!DotSpeed { ratio: SLOW_RATIO }.pays());
        assert!(!DotSpeed { ratio: 4.0 }.pays());
    }
}
