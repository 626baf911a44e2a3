//! Intel AMX (Advanced Matrix Extensions) for the linear layers: eight tile registers of 16
//! rows × 64 bytes, and
//!
//! - `tdpbusd`, which multiplies a 16 × 64 tile of u8 activations by a 64 × 16 tile of i8
//!   weights into 16 × 16 i32 sums — 16,384 multiply-adds per instruction, sixteen times one
//!   AVX-512 VNNI `vpdpbusd`. The sums are exact, so the int8 kernels' results are identical;
//! - `tdpbf16ps`, the same with 16 × 32 bf16 activations and 32 × 16 bf16 weights into f32
//!   sums — sixteen times one AVX-512 BF16 `vdpbf16ps` (the f32 sums are added in another
//!   order, so results differ from the AVX-512 kernel's by f32 rounding).
//!
//! Both read the weights packed as the AVX-512 kernels read them (per panel of outputs, per
//! group of 4 bytes of inputs, the panel's outputs side by side), with panels 16 outputs
//! wide: then 16 groups of one panel are one contiguous 1 KiB B tile.
//!
//! Rust has no stable AMX intrinsics, so the instructions are written as inline assembly.
//! They need, besides the CPU features AMX-TILE and AMX-INT8, the operating system's
//! permission to use the 8 KiB of tile state per thread: on Linux (5.16+) a process asks for
//! it once with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`. Without the
//! permission the first tile instruction raises SIGILL, so [`Amx::detect`] only returns a
//! proof once the request succeeded. Elsewhere (other OSes, other CPUs) detection fails and
//! the int8 path uses the VNNI kernel.
//!
//! Setting the environment variable `RAG_INGEST_AMX=0` turns AMX off (to compare the two
//! kernels; the results do not change).

/// Rows of a tile (A, B and C tiles alike are configured 16 × 64 bytes).
pub(super) const TILE_ROWS: usize = 16;
/// Bytes per tile row: 64 u8 activations of a row of A; 16 outputs × 4 inputs of B.
pub(super) const TILE_BYTES: usize = 64;

/// Which kernel computes a reduced-precision product (AMX where the CPU and OS allow it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// The AVX-512 kernel (VNNI `vpdpbusd` for int8, `vpdpwssd` for int16, `vdpbf16ps` for
    /// bf16), 8 × 48 tiles.
    Avx512,
    /// Intel AMX tiles, 32 × 32 output blocks.
    Amx,
    /// The AVX2 kernel of int8 and int16 (`vpmaddwd` on i16 activations, 6 × 16 tiles),
    /// for CPUs without AVX-512 VNNI (int16: without a fast `vpdpwssd`). bf16 has none: for
    /// bf16 it means the AVX-512 kernel.
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU and OS allow: AMX, else AVX-512 where the CPU has AVX-512
    /// VNNI (every CPU with AVX-512 BF16 has it), else AVX2 where the CPU has AVX2 and FMA,
    /// else AVX-512 (which then fails to load, naming the missing features).
    pub(crate) fn best() -> Self {
        if Amx::detect().is_some() {
            Self::Amx
        } else if super::int8::vnni_missing().is_some() && super::int8::avx2_missing().is_none() {
            Self::Avx2
        } else {
            Self::Avx512
        }
    }

    /// Name for logs and `doctor`: `"amx"`, `"avx512"` or `"avx2"`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Amx => "amx",
            Self::Avx2 => "avx2",
        }
    }
}

/// Proof that this thread may run tile instructions: only [`Amx::detect`] creates one.
/// Uninhabited where AMX is never used, so that code using it is statically unreachable.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[derive(Clone, Copy, Debug)]
pub(super) struct Amx(());

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
#[derive(Clone, Copy, Debug)]
pub(super) enum Amx {}

impl Amx {
    /// `Some` if the CPU has AMX-TILE, AMX-INT8 and AMX-BF16 and the kernel granted this
    /// process the tile state (asked once per process), unless `RAG_INGEST_AMX=0`.
    pub(super) fn detect() -> Option<Self> {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let disabled = std::env::var_os("RAG_INGEST_AMX").is_some_and(|v| v == "0");
            (!disabled && *GRANTED.get_or_init(linux::request)).then_some(Self(()))
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            None
        }
    }

    /// Configures the calling thread's tiles (all eight 16 × 64 bytes) for the products of
    /// [`Tiles`]; they are released when it drops.
    pub(super) fn tiles(self) -> Tiles {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let mut config = Config([0; 64]);
            config.0[0] = 1; // palette 1
            for tile in 0..8 {
                // Bytes per row (little-endian u16 at 16 + 2t), rows (u8 at 48 + t).
                config.0[16 + 2 * tile] = TILE_BYTES as u8;
                config.0[48 + tile] = TILE_ROWS as u8;
            }
            // SAFETY: `self` proves the CPU has AMX-TILE and the OS granted the tile state;
            // the configuration is a valid palette-1 configuration (8 tiles of 16 rows × 64
            // bytes, the maximum) and 64 bytes long, which `ldtilecfg` reads.
            unsafe {
                std::arch::asm!(
                    "ldtilecfg [{}]",
                    in(reg) config.0.as_ptr(),
                    options(nostack, readonly, preserves_flags)
                );
            }
            Tiles {
                _amx: self,
                _thread: std::marker::PhantomData,
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        match self {}
    }
}

/// Whether the CPU has the AMX tile unit (CPUID), whether or not this process may use it.
/// On such a CPU (Intel Sapphire Rapids and later) AVX-512 BF16's `vdpbf16ps` is no faster
/// than f32 FMA: without AMX, bf16 does not pay there.
pub(crate) fn in_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && {
            // CPUID leaf 7 exists on every CPU with AVX-512.
            let leaf = std::arch::x86_64::__cpuid_count(7, 0);
            leaf.edx & (1 << 24) != 0
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The 64-byte tile configuration `ldtilecfg` reads.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[repr(C, align(64))]
struct Config([u8; 64]);

/// The body of the 2 × 2 tile products, for the dot-product instruction `$op`.
macro_rules! product {
    ($self:ident, $op:literal, $a:ident, $lda:ident, $b:ident, $ldb:ident, $steps:ident, $c:ident) => {{
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            use std::arch::asm;
            let _ = &$self;
            // SAFETY: the tiles are configured (`$self`), so tile instructions are valid.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem, preserves_flags)
                )
            };
            let b_step = TILE_ROWS * $ldb;
            for s in 0..$steps {
                // SAFETY: the caller guarantees the tiles read here are readable
                // (`wrapping_add`: the pointers are only dereferenced by the loads).
                unsafe {
                    asm!(
                        "tileloadd tmm4, [{a0} + {lda}*1]",
                        "tileloadd tmm5, [{a1} + {lda}*1]",
                        "tileloadd tmm6, [{b0} + {ldb}*1]",
                        "tileloadd tmm7, [{b1} + {ldb}*1]",
                        concat!($op, " tmm0, tmm4, tmm6"),
                        concat!($op, " tmm1, tmm4, tmm7"),
                        concat!($op, " tmm2, tmm5, tmm6"),
                        concat!($op, " tmm3, tmm5, tmm7"),
                        a0 = in(reg) $a[0].wrapping_add(TILE_BYTES * s),
                        a1 = in(reg) $a[1].wrapping_add(TILE_BYTES * s),
                        b0 = in(reg) $b[0].wrapping_add(b_step * s),
                        b1 = in(reg) $b[1].wrapping_add(b_step * s),
                        lda = in(reg) $lda,
                        ldb = in(reg) $ldb,
                        options(nostack, readonly, preserves_flags)
                    );
                }
            }
            let stride = TILE_ROWS * 4;
            let [c0, c1, c2, c3] = $c;
            // SAFETY: each `c` tile holds 16 rows of 16 four-byte values = 64 bytes,
            // `stride` apart.
            unsafe {
                asm!(
                    "tilestored [{c0} + {stride}*1], tmm0",
                    "tilestored [{c1} + {stride}*1], tmm1",
                    "tilestored [{c2} + {stride}*1], tmm2",
                    "tilestored [{c3} + {stride}*1], tmm3",
                    c0 = in(reg) c0.as_mut_ptr(),
                    c1 = in(reg) c1.as_mut_ptr(),
                    c2 = in(reg) c2.as_mut_ptr(),
                    c3 = in(reg) c3.as_mut_ptr(),
                    stride = in(reg) stride,
                    options(nostack, preserves_flags)
                );
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            let _ = ($a, $lda, $b, $ldb, $steps, $c);
            match $self._amx {}
        }
    }};
}

/// The calling thread's configured tiles: 0–3 accumulate a 2 × 2 block of 16 × 16 i32 sums,
/// 4–5 hold two 16-row slices of A, 6–7 two 16-column slices of B. Not `Send`: tile state
/// belongs to the thread that configured it.
pub(super) struct Tiles {
    _amx: Amx,
    /// Makes `Tiles` neither `Send` nor `Sync`.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Tiles {
    /// `c[2i + j] = Σ_s A_i(s) · B_j(s)` over `steps` steps of 64 input bytes (64 u8
    /// inputs), where `A_i(s)` is the 16 × 64 u8 tile at `a[i] + 64s` (rows `lda` bytes
    /// apart) and `B_j(s)` the 16 × 64 i8 tile at `b[j] + 16·ldb·s` (rows of 16 outputs × 4
    /// inputs, `ldb` bytes apart): a 32 × 32 block of exact i32 dot products, each `c` tile
    /// row-major 16 × 16.
    ///
    /// # Safety
    ///
    /// For every step `s < steps`, the 16 rows of 64 bytes at `a[i] + 64s + r·lda` and at
    /// `b[j] + 16·ldb·s + r·ldb` (`r < 16`) must be readable.
    pub(super) unsafe fn product_u8i8(
        &mut self,
        a: [*const u8; 2],
        lda: usize,
        b: [*const u8; 2],
        ldb: usize,
        steps: usize,
        c: &mut [[i32; TILE_ROWS * TILE_ROWS]; 4],
    ) {
        // The caller's contract covers the loads; i32 fills the 4-byte C elements.
        product!(self, "tdpbusd", a, lda, b, ldb, steps, c)
    }

    /// Like [`Tiles::product_u8i8`] with bf16 inputs and f32 sums: a step is 64 bytes = 32
    /// bf16 inputs, a B tile row holds 16 outputs × 2 inputs.
    ///
    /// # Safety
    ///
    /// As for [`Tiles::product_u8i8`].
    pub(super) unsafe fn product_bf16(
        &mut self,
        a: [*const u8; 2],
        lda: usize,
        b: [*const u8; 2],
        ldb: usize,
        steps: usize,
        c: &mut [[f32; TILE_ROWS * TILE_ROWS]; 4],
    ) {
        // The caller's contract covers the loads; f32 fills the 4-byte C elements.
        product!(self, "tdpbf16ps", a, lda, b, ldb, steps, c)
    }
}

/// A 2 × 2 tile product ([`Tiles::product_u8i8`] or [`Tiles::product_bf16`]).
pub(super) type Product<T> = unsafe fn(
    &mut Tiles,
    [*const u8; 2],
    usize,
    [*const u8; 2],
    usize,
    usize,
    &mut [[T; TILE_ROWS * TILE_ROWS]; 4],
);

/// One 16 × 16 tile of sums for an epilogue: output rows `first..first + rows` (only those
/// inside the output) and columns `column..column + 16`, of which the lanes set in `mask`
/// are inside the output.
pub(super) struct TileSums<'t, T> {
    /// Row-major 16 × 16.
    pub sums: &'t [T; TILE_ROWS * TILE_ROWS],
    pub first: usize,
    pub rows: usize,
    pub column: usize,
    pub mask: u16,
}

impl Tiles {
    /// The whole product of a `rows × n` output, 32 × 32 at a time: for each pair of
    /// 16-output panels of `b` (panel `s` at `b + s·panel_bytes`, rows of 64 bytes) and each
    /// 32-row block of `a` (rows `lda` bytes apart), `product` sums `steps` steps, then
    /// `epilogue` gets each of the four tiles that lies inside the output.
    ///
    /// # Safety
    ///
    /// `a` must hold `rows` rounded up to 32 rows of `lda ≥ 64·steps` bytes; `b` an even
    /// number of panels, at least `n / 16` rounded up, of `panel_bytes ≥ 1024·steps` bytes.
    pub(super) unsafe fn blocks<T>(
        &mut self,
        product: Product<T>,
        (a, lda, rows): (*const u8, usize, usize),
        (b, panel_bytes, n): (*const u8, usize, usize),
        steps: usize,
        sums: &mut [[T; TILE_ROWS * TILE_ROWS]; 4],
        mut epilogue: impl FnMut(TileSums<'_, T>),
    ) {
        let panel = |s: usize| b.wrapping_add(s * panel_bytes);
        for s0 in (0..n.div_ceil(TILE_ROWS)).step_by(2) {
            let b = [panel(s0), panel(s0 + 1)];
            for r0 in (0..rows).step_by(2 * TILE_ROWS) {
                let a = [
                    a.wrapping_add(r0 * lda),
                    a.wrapping_add((r0 + TILE_ROWS) * lda),
                ];
                // SAFETY: rows `r0..r0 + 32` of `a` exist (padded to 32 rows), each with
                // `steps` steps of 64 bytes; panels `s0` and `s0 + 1` exist (an even count),
                // each 16 rows of 64 bytes per step (this function's contract).
                unsafe { product(self, a, lda, b, TILE_BYTES, steps, sums) };
                for (t, tile) in sums.iter().enumerate() {
                    let column = (s0 + t % 2) * TILE_ROWS;
                    if column >= n {
                        continue;
                    }
                    let lanes = (n - column).min(TILE_ROWS);
                    let first = r0 + (t / 2) * TILE_ROWS;
                    epilogue(TileSums {
                        sums: tile,
                        first,
                        rows: rows.saturating_sub(first).min(TILE_ROWS),
                        column,
                        // At most 16 ones, so the cast is exact.
                        mask: ((1u32 << lanes) - 1) as u16,
                    });
                }
            }
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        // SAFETY: the tiles were configured by this thread (`Amx::tiles`); `tilerelease`
        // returns them to the init state, so the kernel need not save them on a switch.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags));
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod linux {
    /// `arch_prctl` request for permission to use an extended state component.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    /// The AMX tile data state component.
    const XFEATURE_XTILEDATA: libc::c_long = 18;

    /// Whether the CPU has AMX-BF16, AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits 22, 24
    /// and 25) and the kernel granted this process the tile state.
    pub(super) fn request() -> bool {
        // CPUID leaf 7 exists on every CPU with AVX-512 (checked by the caller first) and
        // is answered with zeros where it does not.
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        let bf16 = leaf.edx & (1 << 22) != 0;
        let (tile, int8) = (leaf.edx & (1 << 24) != 0, leaf.edx & (1 << 25) != 0);
        if !(tile && int8 && bf16) {
            return false;
        }
        // SAFETY: the request only changes this process's permitted xstate components; it
        // fails (non-zero) on kernels without AMX support.
        let status = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        status == 0
    }
}
