//! Matrix multiplication with int8 weights and u8 activations, accumulated in i32 with
//! AVX-512 VNNI (`vpdpbusd`), for the linear layers of the int8 forward pass.
//!
//! Quantisation:
//!
//! - weights per output channel, symmetric: `w ≈ sw[c] · q` with `q ∈ [-127, 127]`, once at
//!   load time;
//! - activations per row (token), asymmetric: `x ≈ sa[r] · (u − zp[r])` with `u ∈ [0, 255]`,
//!   computed for each call right before the product, so each token uses its own range;
//! - optionally *smoothed* (SmoothQuant): input channel `j` of the activations is divided by
//!   `s[j]` and the weights' column `j` multiplied by it, which leaves the product unchanged
//!   in exact arithmetic but moves the range of outlier channels (a few channels of BERT's
//!   hidden states are tens of times larger than the rest) from the activations, quantised
//!   per token, into the weights, quantised per channel. `s` comes from calibration
//!   ([`smoothing`]).
//!
//! Then `x·w = sa[r]·sw[c]·(Σ u·q − zp[r]·Σ q)`: the kernel computes `Σ u·q` exactly in
//! i32 and the epilogue subtracts `zp[r]·Σ_k q[c][k]` (precomputed per output) and scales.
//!
//! The kernel computes an `MR × NR` (8 × 48) tile of the output in 24 zmm accumulators: for
//! each quad of inputs `k..k+4` it loads 48 columns × 4 weights (three vectors of 64 bytes),
//! broadcasts each row's four activations (one 32-bit word) and issues `vpdpbusd`, which adds
//! `Σ_{i<4} u[k+i]·q[k+i]` to each i32 lane: four inputs per instruction where bf16 does two.
//!
//! Where the CPU has Intel AMX (and the OS grants it), the same products run on AMX tiles
//! instead ([`super::amx`]): 32 × 32 output blocks, 64 inputs per step, identical sums. For
//! AMX the weights are packed in panels of 16 outputs (so that a B tile's rows are
//! contiguous), the inputs padded to a multiple of 64 and the panels to an even count.
//!
//! On a CPU without AVX-512 VNNI but with AVX2 and FMA, the products run on AVX2 instead
//! ([`avx2`], [`Kernel::Avx2`]): the same int8 weights, but activations quantised per row
//! to *i16*, symmetric, with as many levels as the i32 sums allow without overflow (±11,008
//! at 1,536 inputs), multiplied in pairs by `vpmaddwd`. Its activations are thus finer than
//! VNNI's 256 levels; the weights, the smoothing and the outlier channels are the same.
//!
//! Weights wider than int8 (`precision = "int16"`: ±2,047) take 16-bit activations on
//! either kernel: on AVX2 as above, on AVX-512 VNNI with `vpdpwssd` (two i16 multiply-adds
//! per i32 lane, accumulated: 32 per instruction, twice an f32 FMA's) in the same 8 × 48
//! tiles as int8, the pairs of i16 weights packed where int8's quads of bytes are. Both
//! compute the same exact i32 sums and the same f32 epilogue, so their outputs are
//! bit-identical.
//!
//! Everything `unsafe` here is reached only through an [`Int8Weight`], which can only be
//! built after run-time detection of AVX-512F, AVX-512BW and AVX-512 VNNI, or of AVX2 and
//! FMA for the AVX2 kernel.

mod avx2;

pub(crate) use super::amx::Kernel;
use super::amx::{Amx, TILE_BYTES, TILE_ROWS};
use super::tile::{self, LANES, MC, Start};

/// The largest magnitude of an int8 weight: what every kernel takes.
pub(crate) const INT8_LEVELS: i16 = 127;
/// The largest magnitude of a weight of `precision = "int16"` (12 bits), on the AVX2 or the
/// AVX-512 kernel with 16-bit activations. Its activations then get ±683 levels at 1,536
/// inputs, ±2,732 at 384 ([`avx2::activation_levels`]).
pub(crate) const INT16_LEVELS: i16 = 2047;

/// Columns of an output tile: three vectors of 16 i32 lanes.
const NR: usize = 48;
/// Rows of an output tile.
const MR: usize = 8;
/// Rows of the AMX kernel's output block (two A tiles); a multiple of it divides [`MC`].
const AMX_ROWS: usize = 2 * TILE_ROWS;

/// Proof that the CPU runs a kernel, and which: only [`Cpu::detect`] creates one.
/// Uninhabited where no kernel exists, so that code using it is statically unreachable
/// there.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cpu {
    /// AVX-512F, AVX-512BW and AVX-512 VNNI (the VNNI and AMX kernels).
    Vnni,
    /// The same, for weights wider than int8 and i16 activations (`vpdpwssd`).
    VnniPairs,
    /// AVX2 and FMA (the [`avx2`] kernel).
    Avx2,
}

#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cpu {}

impl Cpu {
    /// The CPU features `kernel` needs, if this CPU has them: AVX2 and FMA for
    /// [`Kernel::Avx2`], AVX-512F/BW/VNNI for the others; `pairs` if the weights are wider
    /// than int8 (i16 activations).
    fn detect(kernel: Kernel, pairs: bool) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            match kernel {
                Kernel::Avx2 => avx2_missing().is_none().then_some(Self::Avx2),
                Kernel::Avx512 if pairs => vnni_missing().is_none().then_some(Self::VnniPairs),
                Kernel::Avx512 | Kernel::Amx => vnni_missing().is_none().then_some(Self::Vnni),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (kernel, pairs);
            None
        }
    }
}

/// `None` if this CPU can run an int8 kernel (AVX-512 VNNI, or AVX2 and FMA), else the CPU
/// features it lacks (named as `is_x86_feature_detected!` names them; `/proc/cpuinfo` says
/// `avx512_vnni`).
pub(crate) fn missing_features() -> Option<String> {
    let vnni = vnni_missing()?;
    let avx2 = avx2_missing()?;
    Some(format!("{avx2} (or AVX-512: {vnni})"))
}

/// `None` if this CPU has AVX-512F, AVX-512BW and AVX-512 VNNI, else those it lacks.
pub(crate) fn vnni_missing() -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        super::tile::missing(&[
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
            (
                "avx512vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
        ])
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Some("x86_64 with avx512f, avx512bw, avx512vnni".to_owned())
    }
}

/// `None` if this CPU has AVX2 and FMA (the [`avx2`] kernel), else those it lacks.
pub(crate) fn avx2_missing() -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        super::tile::missing(&[
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
        ])
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Some("x86_64 with avx2, fma".to_owned())
    }
}

/// Smoothing factors `s[j] = max|x_j|^α / max|W_·j|^(1−α)` for each input channel `j`, from
/// the largest absolute activation seen per channel in calibration (`activation_max`) and the
/// weights (`outputs × inputs`, row-major); `alpha` in `[0, 1]` says how much of the range
/// moves into the weights (SmoothQuant's migration strength). Channels never active, or with
/// zero weights, get 1 (no smoothing).
pub(crate) fn smoothing(
    activation_max: &[f32],
    weight: &[f32],
    outputs: usize,
    alpha: f32,
) -> Vec<f32> {
    let inputs = activation_max.len();
    let mut weight_max = vec![0f32; inputs];
    for row in weight.chunks_exact(inputs.max(1)).take(outputs) {
        for (m, w) in weight_max.iter_mut().zip(row) {
            *m = m.max(w.abs());
        }
    }
    activation_max
        .iter()
        .zip(&weight_max)
        .map(|(&a, &w)| {
            if a > 0.0 && w > 0.0 && a.is_finite() && w.is_finite() {
                let s = a.powf(alpha) / w.powf(1.0 - alpha);
                if s.is_finite() && s > 0.0 { s } else { 1.0 }
            } else {
                1.0
            }
        })
        .collect()
}

/// A weight matrix `W` (`outputs × inputs`) quantised to int8 per output channel and packed
/// for the kernel: for each panel of [`NR`] outputs (16 for AMX), for each quad of inputs,
/// the panel's outputs' four weights side by side. Outputs past the end of the last panel and
/// inputs past the last full quad are zero.
pub(crate) struct Int8Weight {
    /// `panels × quads × width × 4` bytes (`width` = [`NR`], or 16 for AMX): for each
    /// quad of inputs, each output's four int8 weights; for weights wider than int8 on
    /// AVX-512, for each pair of inputs, each output's two i16 weights (little-endian
    /// bytes). Empty for AVX2.
    data: Vec<i8>,
    /// For the AVX2 kernel, `panels × pairs × 16 × 2`: for each panel of 16 outputs, for
    /// each pair of inputs, the outputs' two weights side by side, widened to i16 (see
    /// [`avx2`]); else empty.
    pairs: Vec<i16>,
    /// Where activations are i16 (the AVX2 kernel, and weights wider than int8 on
    /// AVX-512), the largest magnitude of a quantised activation: the i32 sums of `inputs`
    /// products cannot overflow ([`avx2::activation_levels`]); else 0.
    levels: i32,
    /// Scale of each output channel (at least `panels × width` and 48, zero past
    /// `outputs`).
    scales: Vec<f32>,
    /// `Σ_k q[c][k]` of each output channel (as long as `scales`).
    sums: Vec<i32>,
    /// What each input channel is multiplied by before quantisation: `1 / s[j]` if
    /// smoothed, 0 for an outlier channel (computed in f32 instead), else 1; `None` if all 1.
    unsmooth: Option<Vec<f32>>,
    /// The outlier input channels, computed in f32 beside the int8 product.
    outliers: Vec<usize>,
    /// Their weights, `outliers.len() × outputs` (transposed, for contiguous output rows).
    outlier_weights: Vec<f32>,
    inputs: usize,
    outputs: usize,
    /// 32-bit words of quantised activations per row: `ceil(inputs / 4)` quads of u8,
    /// rounded up to a multiple of 16 for AMX; with i16 activations `ceil(inputs / 2)`
    /// pairs.
    quads: usize,
    cpu: Cpu,
    /// Set if the products run on AMX tiles.
    amx: Option<Amx>,
}

impl Int8Weight {
    /// Quantises `weight` (`outputs × inputs`, row-major), first multiplying its input
    /// columns by `smooth` if given (then activations are divided by it on every call).
    /// The input channels in `outliers` stay out of the int8 product (their weights are
    /// zeroed there, their activations left out of each token's range) and are multiplied in
    /// f32 instead (LLM.int8()'s decomposition): a channel tens of times larger than the
    /// rest would otherwise take most of a token's 256 levels.
    ///
    /// The products run on `kernel` where the CPU and OS allow it (AMX falls back to VNNI).
    /// The weights are quantised to `±weight_levels` per output channel: [`INT8_LEVELS`],
    /// or up to [`i16::MAX`] on the AVX2 kernel (which widens them to i16 anyway) and the
    /// AVX-512 one (which then takes i16 activations and `vpdpwssd`); the activations get
    /// fewer levels the wider the weights ([`avx2::activation_levels`]).
    ///
    /// # Errors
    ///
    /// A message naming the missing CPU features if this CPU cannot run the kernel (AVX2
    /// and FMA for [`Kernel::Avx2`], AVX-512F/BW/VNNI for the others), or saying that AMX
    /// takes no weights wider than int8.
    ///
    /// # Panics
    ///
    /// If `weight` does not hold `outputs × inputs` values or `smooth` not `inputs` (a bug
    /// of the caller).
    pub(crate) fn new(
        weight: &[f32],
        outputs: usize,
        inputs: usize,
        smooth: Option<&[f32]>,
        outliers: &[usize],
        kernel: Kernel,
        weight_levels: i16,
    ) -> Result<Self, String> {
        let avx512_pairs = weight_levels > INT8_LEVELS && kernel == Kernel::Avx512;
        if weight_levels > INT8_LEVELS && kernel == Kernel::Amx {
            return Err(format!(
                "weights of ±{weight_levels} levels need the AVX2 or AVX-512 kernel (AMX \
                 takes ±1 to ±{INT8_LEVELS})"
            ));
        }
        let weight_levels = weight_levels.max(1);
        let cpu = Cpu::detect(kernel, avx512_pairs).ok_or_else(|| {
            let missing = match kernel {
                Kernel::Avx2 => avx2_missing(),
                Kernel::Avx512 | Kernel::Amx => vnni_missing(),
            };
            format!("this CPU lacks {}", missing.unwrap_or_default())
        })?;
        let amx = match kernel {
            Kernel::Amx => Amx::detect(),
            Kernel::Avx512 | Kernel::Avx2 => None,
        };
        assert_eq!(weight.len(), outputs * inputs, "weight shape");
        if let Some(s) = smooth {
            assert_eq!(s.len(), inputs, "smoothing length");
        }
        assert!(outliers.iter().all(|&j| j < inputs), "outlier channel");
        let mut outlier_weights = vec![0f32; outliers.len() * outputs];
        for (o, &j) in outliers.iter().enumerate() {
            for c in 0..outputs {
                outlier_weights[o * outputs + c] = weight[c * inputs + j];
            }
        }
        let mut unsmooth: Option<Vec<f32>> = smooth.map(|s| s.iter().map(|s| 1.0 / s).collect());
        if !outliers.is_empty() {
            let u = unsmooth.get_or_insert_with(|| vec![1.0; inputs]);
            for &j in outliers {
                u[j] = 0.0;
            }
        }
        let packing = if kernel == Kernel::Avx2 {
            avx2::packing(outputs, inputs)
        } else if avx512_pairs {
            tile::Packing::new(outputs, inputs, 2, false)
        } else {
            tile::Packing::new(outputs, inputs, 4, amx.is_some())
        };
        let tile::Packing {
            words: quads,
            width,
            panels,
        } = packing;
        let columns = panels * width;
        let mut scales = vec![0f32; columns.max(NR)];
        let mut sums = vec![0i32; columns.max(NR)];
        let mut rows: Vec<Vec<i16>> = Vec::with_capacity(outputs);
        for (c, row) in weight.chunks_exact(inputs.max(1)).take(outputs).enumerate() {
            let mut smoothed: Vec<f32> = match smooth {
                Some(s) => row.iter().zip(s).map(|(w, s)| w * s).collect(),
                None => row.to_vec(),
            };
            for &j in outliers {
                smoothed[j] = 0.0;
            }
            let max = smoothed.iter().fold(0f32, |m, w| m.max(w.abs()));
            let limit = f32::from(weight_levels);
            let scale = if max > 0.0 { max / limit } else { 1.0 };
            let q: Vec<i16> = smoothed
                .iter()
                // Within ±limit by construction of `scale`; the cast saturates anyway.
                .map(|w| (w / scale).round_ties_even().clamp(-limit, limit) as i16)
                .collect();
            scales[c] = scale;
            sums[c] = q.iter().map(|&v| i32::from(v)).sum();
            rows.push(q);
        }
        let quantised = |o: usize, i: usize| -> i16 {
            rows.get(o).and_then(|row| row.get(i)).copied().unwrap_or(0)
        };
        let (data, pairs, levels) = if kernel == Kernel::Avx2 {
            (
                Vec::new(),
                packing.pack(2, outputs, inputs, quantised),
                avx2::activation_levels(inputs, weight_levels),
            )
        } else if avx512_pairs {
            // Each 32-bit word: two i16 weights, the first in the low half (as `vpdpwssd`
            // pairs them with the activations' words).
            let data = packing
                .pack(2, outputs, inputs, quantised)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .map(u8::cast_signed)
                .collect();
            (
                data,
                Vec::new(),
                avx2::activation_levels(inputs, weight_levels),
            )
        } else {
            // Within ±127 (`INT8_LEVELS`), so the cast is exact.
            let data = packing.pack(4, outputs, inputs, |o, i| quantised(o, i) as i8);
            (data, Vec::new(), 0)
        };
        Ok(Self {
            data,
            pairs,
            levels,
            scales,
            sums,
            unsmooth,
            outliers: outliers.to_vec(),
            outlier_weights,
            inputs,
            outputs,
            quads,
            cpu,
            amx,
        })
    }

    /// `out += x Wᵀ` for every row of `x` (`rows × inputs`); `out` is `rows × outputs`.
    /// With `start`, `out`'s contents are ignored: `out = start + x Wᵀ` (see [`Start`]).
    /// `scratch` holds the quantised activations (resized as needed; old contents do not
    /// matter).
    ///
    /// # Panics
    ///
    /// If `x` and `out` do not have the same number of rows (a bug of the caller).
    pub(crate) fn matmul(
        &self,
        x: &[f32],
        out: &mut [f32],
        scratch: &mut Vec<u32>,
        start: Option<Start<'_>>,
    ) {
        let cpu = self.cpu;
        let pad_rows = if self.amx.is_some() { AMX_ROWS } else { 1 };
        tile::par_blocks(
            (x, self.inputs),
            (out, self.outputs),
            (scratch, self.quads, pad_rows),
            start,
            |x, a, out| {
                #[cfg(target_arch = "x86_64")]
                match cpu {
                    // SAFETY: `Cpu::Vnni` and `Cpu::VnniPairs` exist only if the CPU has
                    // AVX-512F/BW/VNNI; `par_blocks` hands over the same rows of `x` and
                    // `out` and room in `a` for their words, rounded up to 32 rows for AMX.
                    Cpu::Vnni | Cpu::VnniPairs => unsafe { x86::block(x, a, out, self) },
                    // SAFETY: `Cpu::Avx2` exists only if the CPU has AVX2 and FMA, and then
                    // the weights were packed for it; `a` has room for the rows' pairs.
                    Cpu::Avx2 => unsafe { avx2::block(x, a, out, self) },
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (a, x, out);
                    match cpu {}
                }
            },
        );
    }
}

/// Quantisation of one row of activations: `x ≈ scale · (u − zero)`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct RowQuant {
    scale: f32,
    /// In `0..=255`.
    zero: i32,
}

impl RowQuant {
    /// The asymmetric u8 quantisation of values between `min` and `max` (0 is always
    /// representable exactly, so that padding and exact zeros stay zero).
    fn new(min: f32, max: f32) -> Self {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let range = max - min;
        if !(range > 0.0 && range.is_finite()) {
            return Self {
                scale: 1.0,
                zero: 0,
            };
        }
        let scale = range / 255.0;
        // In [0, 255] since 0 ≤ -min ≤ range; the cast is exact for such values.
        let zero = (-min / scale).round_ties_even().clamp(0.0, 255.0) as i32;
        Self { scale, zero }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::{
        __m512, __m512i, _mm_storeu_si128, _mm512_add_epi32, _mm512_cvtepi32_ps,
        _mm512_cvtps_epi32, _mm512_cvtusepi32_epi8, _mm512_dpbusd_epi32, _mm512_fmadd_ps,
        _mm512_loadu_epi32, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_max_epi32, _mm512_max_ps,
        _mm512_min_epi32, _mm512_min_ps, _mm512_mul_ps, _mm512_mullo_epi32, _mm512_reduce_max_ps,
        _mm512_reduce_min_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_si512,
        _mm512_sub_epi32,
    };

    use super::super::amx::{TileSums, Tiles};
    use super::super::tile::{lane_masks, load_lanes, store_lanes};
    use super::{Amx, Cpu, Int8Weight, LANES, MC, MR, NR, RowQuant, TILE_BYTES, TILE_ROWS, avx2};

    /// `out += x Wᵀ` for the rows of `x` (at most [`MC`]), quantising them into `a` first
    /// (u8 quads, or i16 pairs for [`Cpu::VnniPairs`]).
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F, AVX-512BW and AVX-512 VNNI; `x` must hold
    /// `rows × w.inputs` values, `out` `rows × w.outputs` and `a` at least
    /// `rows × w.quads` (with AMX: `rows` rounded up to 32), with `rows ≤ MC`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn block(x: &[f32], a: &mut [u32], out: &mut [f32], w: &Int8Weight) {
        let (k, n, quads) = (w.inputs, w.outputs, w.quads);
        let rows = out.len() / n;
        let pairs = w.cpu == Cpu::VnniPairs;
        let mut quant = [RowQuant {
            scale: 1.0,
            zero: 0,
        }; MC];
        for ((x, a), q) in x
            .chunks_exact(k)
            .zip(a.chunks_exact_mut(quads))
            .zip(quant.iter_mut())
        {
            *q = if pairs {
                // The AVX2 kernel's quantisation (this CPU has AVX2 and FMA, implied by
                // AVX-512F), so that both kernels multiply the same activations.
                avx2::quantise_row(x, w.unsmooth.as_deref(), w.levels, a)
            } else {
                quantise_row(x, w.unsmooth.as_deref(), a)
            };
        }
        add_outliers(x, out, w);
        if let Some(amx) = w.amx {
            // SAFETY: `a` holds `rows` rounded up to 32 rows of `quads` words (this
            // function's contract), `out` `rows × n`, `quant` the rows' quantisation.
            unsafe { amx_block(a, &quant[..rows], out, w, amx) };
            return;
        }
        // SAFETY: `a` holds `rows` rows of `quads` words and `out` `rows × n` values (this
        // function's contract); `quant` has `rows` entries.
        unsafe {
            if pairs {
                panels::<true>(a, &quant[..rows], out, w);
            } else {
                panels::<false>(a, &quant[..rows], out, w);
            }
        }
    }

    /// `out += sa·sw·(a·Bᵀ − zp·Σq)` in tiles of [`MR`] × [`NR`], for the `quant.len()`
    /// rows of `out`: i16 pairs (`vpdpwssd`, no zero point) if `PAIRS`, else u8 quads
    /// (`vpdpbusd`).
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F/BW/VNNI; `a` must hold `quant.len()` rows of `w.quads`
    /// words, `out` `quant.len() × w.outputs` values; `w.data` must be packed for this
    /// kernel (panels of [`NR`] outputs).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn panels<const PAIRS: bool>(
        a: &[u32],
        quant: &[RowQuant],
        out: &mut [f32],
        w: &Int8Weight,
    ) {
        let (n, quads, rows) = (w.outputs, w.quads, quant.len());
        for panel in 0..n.div_ceil(NR) {
            let columns = (n - panel * NR).min(NR);
            let masks = lane_masks(columns);
            let b = &w.data[panel * quads * NR * 4..(panel + 1) * quads * NR * 4];
            let scales = &w.scales[panel * NR..(panel + 1) * NR];
            let sums = &w.sums[panel * NR..(panel + 1) * NR];
            for r0 in (0..rows).step_by(MR) {
                let a = &a[r0 * quads..];
                let out = &mut out[r0 * n + panel * NR..];
                let quant = &quant[r0..];
                let epilogue = Epilogue {
                    scales,
                    sums,
                    quant,
                    masks,
                    ldc: n,
                };
                // SAFETY (all arms): the tile's rows `r0..r0 + R` exist (`R ≤ rows - r0`), so
                // `a` holds `R` rows of `quads` words, `quant` `R` entries, `b` holds
                // `quads × NR × 4` values and `out` reaches row `R - 1`, column
                // `columns - 1` (masked beyond); the CPU features are this function's own
                // precondition.
                unsafe {
                    match rows - r0 {
                        8.. => tile::<8, PAIRS>(a, quads, b, out, &epilogue),
                        7 => tile::<7, PAIRS>(a, quads, b, out, &epilogue),
                        6 => tile::<6, PAIRS>(a, quads, b, out, &epilogue),
                        5 => tile::<5, PAIRS>(a, quads, b, out, &epilogue),
                        4 => tile::<4, PAIRS>(a, quads, b, out, &epilogue),
                        3 => tile::<3, PAIRS>(a, quads, b, out, &epilogue),
                        2 => tile::<2, PAIRS>(a, quads, b, out, &epilogue),
                        _ => tile::<1, PAIRS>(a, quads, b, out, &epilogue),
                    }
                }
            }
        }
    }

    /// `out += sa·sw·(a·Bᵀ − zp·Σq)` on AMX tiles, 32 × 32 outputs at a time, for the
    /// `quant.len()` rows of `out`.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F/BW; `a` must hold `quant.len()` rounded up to 32 rows of
    /// `w.quads` words (a multiple of 16), `out` `quant.len() × w.outputs` values; `w` must
    /// have been packed for AMX (inputs padded to 64, an even number of panels).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn amx_block(a: &[u32], quant: &[RowQuant], out: &mut [f32], w: &Int8Weight, amx: Amx) {
        let (n, quads, rows) = (w.outputs, w.quads, quant.len());
        let mut tiles = amx.tiles();
        let mut sums = [[0i32; TILE_ROWS * TILE_ROWS]; 4];
        let epilogue = |t: TileSums<'_, i32>| {
            // SAFETY: `scales` and `sums` hold at least `panels × 16 ≥ t.column + 16` values.
            let (column_sums, scales) = unsafe {
                (
                    _mm512_loadu_epi32(w.sums.as_ptr().add(t.column)),
                    _mm512_loadu_ps(w.scales.as_ptr().add(t.column)),
                )
            };
            for (r, row) in t.sums.chunks_exact(TILE_ROWS).take(t.rows).enumerate() {
                let q = quant[t.first + r];
                // SAFETY: `row` holds 16 i32; `out` row `t.first + r < rows` reaches every
                // column set in `t.mask`, and lanes outside it are neither read nor written.
                unsafe {
                    let exact = _mm512_sub_epi32(
                        _mm512_loadu_epi32(row.as_ptr()),
                        _mm512_mullo_epi32(_mm512_set1_epi32(q.zero), column_sums),
                    );
                    let value = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), scales);
                    let p = out.as_mut_ptr().add((t.first + r) * n + t.column);
                    let old = load_lanes(p, t.mask);
                    store_lanes(
                        p,
                        t.mask,
                        _mm512_fmadd_ps(value, _mm512_set1_ps(q.scale), old),
                    );
                }
            }
        };
        // SAFETY: `a` holds `rows` rounded up to 32 rows of `quads` words (4 bytes each, a
        // whole number of 64-byte steps); the weights were packed for AMX: an even number
        // of 16-output panels of `quads` rows of 64 bytes (this function's contract).
        unsafe {
            tiles.blocks(
                Tiles::product_u8i8,
                (a.as_ptr().cast(), quads * 4, rows),
                (w.data.as_ptr().cast(), quads * TILE_BYTES, n),
                quads / (TILE_BYTES / 4),
                &mut sums,
                epilogue,
            );
        }
    }

    /// `out += x[:, outliers] · W[:, outliers]ᵀ` in f32, for the rows of `x` and `out`: 64
    /// outputs at a time (four independent sums, so the multiply-adds do not wait on each
    /// other's latency), each loaded and stored once per 16 outlier channels.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn add_outliers(x: &[f32], out: &mut [f32], w: &Int8Weight) {
        const GROUP: usize = 16;
        const VECTORS: usize = 4;
        let n = w.outputs;
        for (x, out) in x.chunks_exact(w.inputs).zip(out.chunks_exact_mut(n)) {
            for (channels, weights) in w
                .outliers
                .chunks(GROUP)
                .zip(w.outlier_weights.chunks(GROUP * n))
            {
                let mut values = [0f32; GROUP];
                for (v, &j) in values.iter_mut().zip(channels) {
                    *v = x[j];
                }
                let values = &values[..channels.len()];
                for c0 in (0..n).step_by(LANES * VECTORS) {
                    let masks: [u16; VECTORS] = std::array::from_fn(|v| {
                        let lanes = n.saturating_sub(c0 + v * LANES).min(LANES);
                        // At most 16 ones, so the cast is exact.
                        ((1u32 << lanes) - 1) as u16
                    });
                    // SAFETY: lanes inside a vector's mask are columns of `out`'s row and of
                    // each of `weights`' `values.len()` rows of `n` values; lanes outside are
                    // neither read nor written (`wrapping_add`: a vector wholly past the
                    // last column may point past the row).
                    unsafe {
                        let p = out.as_mut_ptr().wrapping_add(c0);
                        let mut acc: [__m512; VECTORS] = std::array::from_fn(|v| {
                            load_lanes(p.wrapping_add(v * LANES), masks[v])
                        });
                        for (o, &v) in values.iter().enumerate() {
                            let value = _mm512_set1_ps(v);
                            let row = weights.as_ptr().wrapping_add(o * n + c0);
                            for (i, acc) in acc.iter_mut().enumerate() {
                                let weight = load_lanes(row.wrapping_add(i * LANES), masks[i]);
                                *acc = _mm512_fmadd_ps(value, weight, *acc);
                            }
                        }
                        for (i, acc) in acc.iter().enumerate() {
                            store_lanes(p.wrapping_add(i * LANES), masks[i], *acc);
                        }
                    }
                }
            }
        }
    }

    /// `acc + Σ_pairs a·b` in each i32 lane (`vpdpwssd`, wrapping), as inline assembly:
    /// through `_mm512_dpwssd_epi32`, LLVM's machine combiner split most of them into
    /// `vpmaddwd` + `vpaddd` (a shorter dependency chain through the accumulator, at twice
    /// the vector instructions), which made the int16 kernel no faster than f32 on Intel
    /// Cascade Lake; the tile's 24 independent accumulators hide the latency anyway.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    pub(in super::super) fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        let mut acc = acc;
        // SAFETY: registers only, no flags; AVX-512F and VNNI are this function's features.
        unsafe {
            asm!(
                "vpdpwssd {acc}, {a}, {b}",
                acc = inout(zmm_reg) acc,
                a = in(zmm_reg) a,
                b = in(zmm_reg) b,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }

    /// What turns a tile's i32 sums into f32 and adds them to the output.
    struct Epilogue<'a> {
        /// The panel's output scales.
        scales: &'a [f32],
        /// The panel's `Σ_k q`.
        sums: &'a [i32],
        /// The tile's rows' quantisation (from its first row on).
        quant: &'a [RowQuant],
        masks: [u16; 3],
        ldc: usize,
    }

    /// One row of activations (divided by `unsmooth`'s reciprocals, if any) to u8 quads (zero
    /// bytes after the last input); returns its quantisation.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn quantise_row(x: &[f32], unsmooth: Option<&[f32]>, a: &mut [u32]) -> RowQuant {
        let vectors = x.len() / LANES;
        let value = |i: usize| -> f32 {
            let v = x[i];
            unsmooth.map_or(v, |u| v * u[i])
        };
        // SAFETY: every load reads 16 f32 at `16i`, inside `x` (and `unsmooth`, which has
        // the same length) since `16(i + 1) ≤ len`.
        let load = |i: usize| -> __m512 {
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr().add(LANES * i));
                match unsmooth {
                    Some(u) => _mm512_mul_ps(v, _mm512_loadu_ps(u.as_ptr().add(LANES * i))),
                    None => v,
                }
            }
        };
        let (mut lo, mut hi) = (_mm512_set1_ps(0.0), _mm512_set1_ps(0.0));
        for i in 0..vectors {
            let v = load(i);
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
        }
        let (mut min, mut max) = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
        for i in vectors * LANES..x.len() {
            min = min.min(value(i));
            max = max.max(value(i));
        }
        let quant = RowQuant::new(min, max);
        let inverse = _mm512_set1_ps(1.0 / quant.scale);
        let zero = _mm512_set1_epi32(quant.zero);
        let (floor, ceiling) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
        let bytes = a.as_mut_ptr().cast::<u8>();
        for i in 0..vectors {
            // Rounds to nearest even (the default MXCSR mode), then clamps to [0, 255].
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(load(i), inverse));
            let q = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(q, zero), floor), ceiling);
            // SAFETY: writes 16 bytes at byte `16i`; `a` has `ceil(len / 4)` words, that is
            // at least `len ≥ 16(i + 1)` bytes.
            unsafe { _mm_storeu_si128(bytes.add(LANES * i).cast(), _mm512_cvtusepi32_epi8(q)) };
        }
        let total = a.len() * 4;
        for i in vectors * LANES..total {
            let byte = if i < x.len() {
                let q = (value(i) / quant.scale).round_ties_even() as i32 + quant.zero;
                // Clamped to [0, 255], so the cast is exact.
                q.clamp(0, 255) as u8
            } else {
                0
            };
            // SAFETY: `i < total`, the byte length of `a`.
            unsafe { bytes.add(i).write(byte) };
        }
        quant
    }

    /// `out[r][0..48] += sa[r]·sw·(Σ_quads a[r]·b − zp[r]·Σq)` for `R` rows: the micro-kernel.
    /// With `PAIRS`, each word of `a` and `b` holds two i16 (`vpdpwssd`) and the zero
    /// point is 0; else four u8 of `a` and four i8 of `b` (`vpdpbusd`).
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F/BW/VNNI; `a` must hold `R` rows of `quads` words each,
    /// `quads` apart, `b` `quads × NR × 4` bytes, `e.quant` at least `R` entries, `e.scales`
    /// and `e.sums` [`NR`] each, and `out` rows `e.ldc` apart reaching every lane set in
    /// `e.masks` of row `R - 1`. With `PAIRS`, the rows' zero points must be 0 and
    /// `Σ|a·b|` of a row and column below 2³¹.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn tile<const R: usize, const PAIRS: bool>(
        a: &[u32],
        quads: usize,
        b: &[i8],
        out: &mut [f32],
        e: &Epilogue<'_>,
    ) {
        let (a, b, out) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
        let mut acc: [[__m512i; 3]; R] = [[_mm512_setzero_si512(); 3]; R];
        for quad in 0..quads {
            // SAFETY: `quad < quads`, so the three 64-byte loads stay inside `b`'s
            // `quads × 192` values and `a` row `r` word `quad` inside `a` (caller's contract).
            unsafe {
                let bp = b.add(quad * NR * 4);
                let b0 = _mm512_loadu_si512(bp.cast());
                let b1 = _mm512_loadu_si512(bp.add(64).cast());
                let b2 = _mm512_loadu_si512(bp.add(128).cast());
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(a.add(r * quads + quad).read().cast_signed());
                    if PAIRS {
                        // Exact: the sums stay below 2³¹ (this function's contract).
                        acc[0] = dpwssd(acc[0], av, b0);
                        acc[1] = dpwssd(acc[1], av, b1);
                        acc[2] = dpwssd(acc[2], av, b2);
                    } else {
                        acc[0] = _mm512_dpbusd_epi32(acc[0], av, b0);
                        acc[1] = _mm512_dpbusd_epi32(acc[1], av, b1);
                        acc[2] = _mm512_dpbusd_epi32(acc[2], av, b2);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let quant = e.quant[r];
            let zero = _mm512_set1_epi32(quant.zero);
            let row_scale = _mm512_set1_ps(quant.scale);
            for (v, (&sum, &mask)) in acc.iter().zip(&e.masks).enumerate() {
                // SAFETY: `e.sums` and `e.scales` hold NR = 3 × 16 values; lanes outside
                // `mask` of `out` are neither read nor written, those inside are in `out`
                // (caller's contract). (`wrapping_add`: a vector wholly past the last column
                // may point past `out`.)
                unsafe {
                    let sums = _mm512_loadu_epi32(e.sums.as_ptr().add(v * LANES));
                    let scales = _mm512_loadu_ps(e.scales.as_ptr().add(v * LANES));
                    // |Σ u·q| ≤ 255 · 127 · inputs and |zp · Σq| ≤ 255 · 127 · inputs: no
                    // overflow below 33,000 inputs. Pairs have no zero point.
                    let exact = if PAIRS {
                        sum
                    } else {
                        _mm512_sub_epi32(sum, _mm512_mullo_epi32(zero, sums))
                    };
                    let value = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), scales);
                    let p = out.wrapping_add(r * e.ldc + v * LANES);
                    let old = load_lanes(p, mask);
                    store_lanes(p, mask, _mm512_fmadd_ps(value, row_scale, old));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::candle::tile::testing::{self, values};

    #[test]
    fn zero_is_exact_and_the_range_is_covered() {
        let q = RowQuant::new(-1.0, 3.0);
        assert!((q.scale - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(q.zero, 64);
        let q = RowQuant::new(0.5, 2.0);
        assert_eq!(q.zero, 0, "a positive row keeps zero representable");
        let q = RowQuant::new(0.0, 0.0);
        assert_eq!((q.scale, q.zero), (1.0, 0));
        let q = RowQuant::new(f32::NEG_INFINITY, 1.0);
        assert_eq!((q.scale, q.zero), (1.0, 0));
    }

    #[test]
    fn smoothing_balances_activation_and_weight_ranges() {
        // Channel 0: activations up to 16, weights up to 1; channel 1: 1 and 4; channel 2
        // never active.
        let weight = [1.0, 4.0, 1.0, -0.5, 2.0, 1.0];
        let s = smoothing(&[16.0, 1.0, 0.0], &weight, 2, 0.5);
        assert!((s[0] - 4.0).abs() < 1e-6, "{s:?}");
        assert!((s[1] - 0.5).abs() < 1e-6, "{s:?}");
        assert_eq!(s[2], 1.0);
    }

    /// The kernels this CPU runs besides AMX (VNNI and/or AVX2), saying which are skipped.
    fn vector_kernels() -> Vec<Kernel> {
        let mut kernels = Vec::new();
        match vnni_missing() {
            None => kernels.push(Kernel::Avx512),
            Some(missing) => eprintln!("SKIPPED (VNNI kernel): {missing} not available"),
        }
        match avx2_missing() {
            None => kernels.push(Kernel::Avx2),
            Some(missing) => eprintln!("SKIPPED (AVX2 kernel): {missing} not available"),
        }
        kernels
    }

    #[test]
    fn matches_a_naive_matmul() {
        // Edge cases of every loop: one element, inputs not a multiple of 4 or 16, partial
        // panels and tiles, several row blocks; with and without smoothing and outliers.
        // Both kernels also with int16's wide weights (i16 activations).
        let variants = vector_kernels()
            .into_iter()
            .flat_map(|kernel| [(kernel, INT8_LEVELS), (kernel, INT16_LEVELS)]);
        for ((kernel, weight_levels), (rows, inputs, outputs, smooth)) in variants
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|variant| {
                [
                    (1, 1, 1, false),
                    (3, 7, 50, false),
                    (9, 33, 48, true),
                    (13, 384, 100, false),
                    (130, 64, 16, true),
                    (200, 1536, 97, false),
                    (7, 40, 25, true),
                ]
                .map(|shape| (variant, shape))
            })
        {
            let x = values(rows * inputs, 1);
            let w = values(outputs * inputs, 2);
            let start = values(rows * outputs, 3);
            let s: Vec<f32> = values(inputs, 4).iter().map(|v| 1.5 + v).collect();
            // Smoothed cases also take two channels out as outliers (computed in f32, so
            // exact up to f32 rounding: the bound below still holds).
            let outliers: Vec<usize> = if smooth {
                vec![0, inputs - 1]
            } else {
                Vec::new()
            };
            let packed = Int8Weight::new(
                &w,
                outputs,
                inputs,
                smooth.then_some(&s[..]),
                &outliers,
                kernel,
                weight_levels,
            )
            .expect("supported");
            let i16_activations = kernel == Kernel::Avx2 || weight_levels > INT8_LEVELS;
            assert_eq!(packed.levels > 0, i16_activations);
            let w_levels = f64::from(weight_levels);
            // Half a step of the activations, relative to a row's largest magnitude: u8
            // over the row's range (at most twice its largest magnitude), or i16 levels.
            let x_half_step = if i16_activations {
                0.5 / f64::from(packed.levels)
            } else {
                1.0 / 255.0
            };
            let mut out = start.clone();
            // Stale scratch contents must not matter.
            let mut scratch = vec![u32::MAX; 5];
            packed.matmul(&x, &mut out, &mut scratch, None);
            for r in 0..rows {
                let row = &x[r * inputs..(r + 1) * inputs];
                let x_max = row
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v / if smooth { s[i] } else { 1.0 }).abs())
                    .fold(0f64, |m, v| m.max(f64::from(v)));
                for c in 0..outputs {
                    let mut exact = f64::from(start[r * outputs + c]);
                    let mut bound = 0.0;
                    let w_max = (0..inputs)
                        .map(|i| {
                            f64::from(w[c * inputs + i] * if smooth { s[i] } else { 1.0 }).abs()
                        })
                        .fold(0f64, f64::max);
                    for i in 0..inputs {
                        let (xi, wi) = (f64::from(row[i]), f64::from(w[c * inputs + i]));
                        let si = if smooth { f64::from(s[i]) } else { 1.0 };
                        exact += xi * wi;
                        // Each factor is off by at most half a step: x by `x_half_step`
                        // of x_max, w by (w_max / levels) / 2, in the smoothed coordinates.
                        let (xs, ws) = ((xi / si).abs(), (wi * si).abs());
                        bound += xs * w_max / (2.0 * w_levels)
                            + ws * x_max * x_half_step
                            + x_max * x_half_step * w_max / w_levels;
                    }
                    let error = (f64::from(out[r * outputs + c]) - exact).abs();
                    assert!(
                        error <= bound * 1.01 + 1e-5,
                        "{kernel:?} ±{weight_levels} {rows}×{inputs}×{outputs} [{r}, {c}]: \
                         error {error}, bound {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_i16_kernels_sum_the_largest_products_without_overflow() {
        // Every activation and weight at its largest magnitude, all of one sign: the i32
        // sums reach inputs · weight levels · levels, just under 2³¹. A wrapped sum would
        // be off by 2³² steps. The AVX2 kernel with int8 and int16 weights, the AVX-512
        // one with int16 weights (with int8 weights it takes u8 activations).
        let kernels = vector_kernels();
        for (kernel, inputs, weight_levels) in [384, 1536, 4099].into_iter().flat_map(|inputs| {
            [
                (Kernel::Avx2, inputs, INT8_LEVELS),
                (Kernel::Avx2, inputs, INT16_LEVELS),
                (Kernel::Avx512, inputs, INT16_LEVELS),
            ]
        }) {
            if !kernels.contains(&kernel) {
                continue;
            }
            let (rows, outputs) = (5, 30);
            let x = vec![1.0f32; rows * inputs];
            let w: Vec<f32> = (0..outputs * inputs)
                .map(|i| if i / inputs % 2 == 0 { 0.5 } else { -0.5 })
                .collect();
            let packed = Int8Weight::new(&w, outputs, inputs, None, &[], kernel, weight_levels)
                .expect("supported");
            let mut out = vec![0.0; rows * outputs];
            packed.matmul(&x, &mut out, &mut Vec::new(), None);
            for (i, &v) in out.iter().enumerate() {
                let exact = if i % outputs % 2 == 0 { 0.5 } else { -0.5 } * inputs as f32;
                assert!(
                    (v - exact).abs() <= exact.abs() * 1e-5,
                    "{kernel:?}, {inputs} inputs, ±{weight_levels}, element {i}: {v} instead \
                     of {exact}"
                );
            }
        }
    }

    /// Asserts that the two `kernels` give bit-identical products with `weight_levels` on
    /// each `(rows, inputs, outputs, smooth)` shape (a smoothed shape also computes its
    /// middle input channel in f32, as an outlier), from stale scratch; `seed` picks the
    /// values.
    fn assert_identical_products(
        kernels: [Kernel; 2],
        weight_levels: i16,
        shapes: &[(usize, usize, usize, bool)],
        seed: u64,
    ) {
        for &(rows, inputs, outputs, smooth) in shapes {
            let x: Vec<f32> = values(rows * inputs, seed)
                .iter()
                .map(|v| v * 3.0)
                .collect();
            let w = values(outputs * inputs, seed + 1);
            let start = values(rows * outputs, seed + 2);
            let s: Vec<f32> = values(inputs, seed + 3).iter().map(|v| 1.5 + v).collect();
            let outliers: Vec<usize> = if smooth { vec![inputs / 2] } else { Vec::new() };
            let [first, second] = kernels.map(|kernel| {
                let packed = Int8Weight::new(
                    &w,
                    outputs,
                    inputs,
                    smooth.then_some(&s[..]),
                    &outliers,
                    kernel,
                    weight_levels,
                )
                .expect("supported");
                assert_eq!(packed.amx.is_some(), kernel == Kernel::Amx);
                let mut out = start.clone();
                // Stale scratch contents must not matter (AMX reads padding rows).
                let mut scratch = vec![u32::MAX; 7];
                packed.matmul(&x, &mut out, &mut scratch, None);
                out
            });
            for (i, (a, b)) in first.iter().zip(&second).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "{kernels:?} ±{weight_levels} {rows}×{inputs}×{outputs} element {i}: \
                     {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn int16_on_avx512_and_on_avx2_gives_identical_products() {
        if let Some(missing) = vnni_missing() {
            eprintln!("SKIPPED: {missing} not available");
            return;
        }
        // Both kernels quantise the activations alike, sum the same i16 products exactly
        // in i32 and share the epilogue's and the outlier channels' f32 arithmetic, so the
        // outputs must be bit-identical. Shapes cover partial 8-row tiles and 48- and
        // 16-column panels, odd inputs, several parallel row blocks, smoothing and outliers.
        assert_identical_products(
            [Kernel::Avx512, Kernel::Avx2],
            INT16_LEVELS,
            &[
                (1, 1, 1, false),
                (3, 7, 50, true),
                (17, 64, 16, false),
                (33, 101, 48, true),
                (65, 384, 1536, true),
                (130, 1536, 384, false),
                (9, 384, 1152, true),
            ],
            9,
        );
    }

    #[test]
    fn amx_takes_no_weights_wider_than_int8() {
        let w = values(16 * 32, 13);
        assert!(Int8Weight::new(&w, 16, 32, None, &[], Kernel::Amx, INT16_LEVELS).is_err());
    }

    #[test]
    fn amx_and_vnni_give_identical_products() {
        if let Some(missing) = missing_features() {
            eprintln!("SKIPPED: {missing} not available");
            return;
        }
        if Kernel::best() != Kernel::Amx {
            eprintln!("SKIPPED: no AMX (AMX-TILE/AMX-INT8 and the OS's permission) here");
            return;
        }
        // Both kernels sum u8 × i8 products exactly in i32 and share the epilogue's
        // arithmetic, so the outputs must be bit-identical. Shapes cover partial 32-row
        // blocks, inputs not a multiple of 64, outputs not a multiple of 16 or 48, odd
        // panel counts, several parallel row chunks, smoothing and outliers.
        assert_identical_products(
            [Kernel::Avx512, Kernel::Amx],
            INT8_LEVELS,
            &[
                (1, 1, 1, false),
                (3, 7, 50, true),
                (17, 64, 16, false),
                (33, 100, 48, true),
                (64, 384, 384, false),
                (65, 384, 1536, true),
                (300, 1536, 384, true),
                (31, 130, 97, false),
            ],
            5,
        );
    }

    #[test]
    fn a_start_is_written_block_by_block_as_a_separate_pass_would() {
        for kernel in vector_kernels() {
            for levels in [INT8_LEVELS, INT16_LEVELS] {
                testing::fused_start_matches_a_separate_pass(
                    |w, outputs, inputs| {
                        Int8Weight::new(w, outputs, inputs, None, &[1], kernel, levels)
                            .expect("supported")
                    },
                    |packed, x, out, scratch, start| packed.matmul(x, out, scratch, start),
                );
            }
        }
    }
}
