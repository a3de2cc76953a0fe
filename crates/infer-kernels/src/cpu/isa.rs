//! Instruction-set detection and capping: which kernel paths this CPU runs ([`Isa`]), the weight
//! layouts they multiply ([`Layout`]), and whether AMX tiles are usable.
//!
//! [`Isa::qlayout`] (the layout of quantized weights, which depends on their [`QType`]) lives with
//! `QType` in `qmatmul`.
//!
//! [`QType`]: crate::cpu::qmatmul::QType

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::__cpuid_count;

/// Which instruction set a kernel call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The AVX2 kernels with VNNI byte dot products (`vpdpbusd` on 256-bit registers, AVX-512 VL).
    #[cfg(target_arch = "x86_64")]
    Avx2Vnni,
    /// AVX-512 (F, BW, VL, VNNI) over the wide layout: 16 weight rows in the lanes of one register.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// [`Isa::Avx512`] with AMX-INT8 tile products for every 16 tokens (prompts, batches).
    #[cfg(target_arch = "x86_64")]
    Amx,
    /// NEON (every aarch64 CPU): byte products by widening multiplies.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// NEON with the dot-product extension (`sdot`: four byte products summed per lane).
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

/// How a weight (`QWeight`, `HalfWeight`) is laid out, which follows the instruction set that
/// multiplies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Rows in groups of [`NR`](crate::cpu::qmatmul::NR) = 4 (scalar and AVX2 kernels).
    Narrow,
    /// Rows in groups of [`NW`](crate::cpu::NW) = 16, values as unsigned bytes in AMX's B-tile order (AVX-512, AMX).
    Wide,
}

impl Isa {
    /// Every instruction set this target architecture defines, in [`available`](Self::available)'s
    /// order (slowest first; each one's CPU features include the previous one's).
    pub const ALL: &'static [Isa] = &[
        Isa::Scalar,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Vnni,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Amx,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon,
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot,
    ];

    /// The best the running CPU supports.
    pub fn detect() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Isa::available().last().expect("scalar is always available"))
    }

    /// The layout this instruction set multiplies 16-bit float weights in: wide for AVX-512, AMX
    /// and AVX2 (8 rows per register there).
    pub fn hlayout(self) -> Layout {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Layout::Wide,
            _ => self.layout(),
        }
    }

    /// The wide layout for AVX-512 and AMX, the narrow one otherwise (what [`qlayout`](Self::qlayout)
    /// and [`hlayout`](Self::hlayout) refine).
    pub fn layout(self) -> Layout {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Amx => Layout::Wide,
            _ => Layout::Narrow,
        }
    }

    /// Its name: scalar, avx2, avx2-vnni, avx512, amx; on aarch64 scalar, neon, neon-dotprod (what
    /// [`from_name`](Self::from_name) reads back, e.g. from the CLI's `INFER_ISA`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Vnni => "avx2-vnni",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => "amx",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => "neon",
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => "neon-dotprod",
        }
    }

    /// The instruction set [`name`](Self::name) calls `name`, for any this target architecture
    /// defines (whether or not this CPU has it); `None` for other names.
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.iter().copied().find(|isa| isa.name() == name)
    }

    /// The fastest instruction set this CPU has that is not past `cap` in
    /// [`available`](Self::available)'s order (a chain, slowest first): `cap` itself when the CPU
    /// has it, else the best available one before it (e.g. `avx2` for a cap of `amx` on an
    /// AVX2-only CPU). For capping the kernels, e.g. to compare paths.
    pub fn best_up_to(cap: Isa) -> Isa {
        let rank = |isa: Isa| Isa::ALL.iter().position(|&i| i == isa).expect("ALL lists every Isa");
        Isa::available().into_iter().take_while(|&isa| rank(isa) <= rank(cap)).last().unwrap_or(Isa::Scalar)
    }

    /// Every path this CPU can run, slowest first (tests force each in turn); each one's CPU
    /// features include the previous one's, and the last is [`detect`](Self::detect)'s.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
            v.push(Isa::Avx2);
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                v.push(Isa::Avx2Vnni);
                if std::is_x86_feature_detected!("avx512bw") {
                    v.push(Isa::Avx512);
                    if amx_available() {
                        v.push(Isa::Amx);
                    }
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Isa::Neon);
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                v.push(Isa::NeonDot);
            }
        }
        v
    }
}

/// Whether the CPU has AMX-INT8 and the OS lets this process use the tile registers (asked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn amx_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU with AVX-512 (checked before this call).
        let edx = unsafe { __cpuid_count(7, 0) }.edx;
        edx & (3 << 24) == 3 << 24 && request_tile_state()
    })
}

/// Whether the CPU has AMX-BF16 (and the tile state was granted, see [`amx_available`]).
#[cfg(target_arch = "x86_64")]
pub(crate) fn amx_bf16_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every CPU that reaches here (AMX-INT8 was found in it).
        let edx = unsafe { __cpuid_count(7, 0) }.edx;
        amx_available() && edx & (1 << 22) != 0
    })
}

/// Asks Linux for the AMX tile data state (process-wide; fails where the kernel or hypervisor does
/// not enable it).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes the process's permitted state components.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The instruction set detected at run time is the one the environment says this CPU has
    /// (`INFER_EXPECT_ISA`, set by scripts/neon-check.sh for each emulated CPU; no check without it).
    #[test]
    fn detection_finds_the_expected_instruction_set() {
        if let Ok(want) = std::env::var("INFER_EXPECT_ISA") {
            assert_eq!(Isa::detect().name(), want);
            assert_eq!(Isa::available().last().map(|i| i.name()), Some(want.as_str()));
        }
    }

    /// Names read back; a cap gives itself when available, else the best available one below it.
    #[test]
    fn names_and_caps() {
        let available = Isa::available();
        assert_eq!(available, Isa::ALL[..available.len()], "available() is a prefix of the chain");
        for (k, &isa) in Isa::ALL.iter().enumerate() {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
            let want = if k < available.len() { isa } else { *available.last().unwrap() };
            assert_eq!(Isa::best_up_to(isa), want, "cap {isa:?}");
        }
        assert_eq!(Isa::from_name("sse2"), None);
        assert_eq!(Isa::best_up_to(Isa::Scalar), Isa::Scalar);
        assert_eq!(Isa::best_up_to(*Isa::ALL.last().unwrap()), Isa::detect());
    }
}
