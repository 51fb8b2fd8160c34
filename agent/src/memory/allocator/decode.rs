//! The instructions read at the start of an allocator function: a leading
//! NULL check to probe past, and an unconditional jump that makes the
//! function a forwarder. Bytes in, addresses out; no ELF here.

/// Length of a leading `test %rdi,%rdi; je …` (x86-64), the NULL check
/// `free` starts with in glibc. A uprobe on `test` is single-stepped out of
/// line, which costs about 9 µs per call on these machines, while the
/// instruction after the check (a `push`) is emulated at a tenth of that;
/// past the check `%rdi` still holds the pointer, and `free(NULL)` frees
/// nothing we follow.
pub fn null_check_len(code: &[u8]) -> Option<u64> {
    match code {
        [0x48, 0x85, 0xff, 0x74, _, ..] => Some(5),
        [0x48, 0x85, 0xff, 0x0f, 0x84, _, _, _, _, ..] => Some(9),
        _ => None,
    }
}

/// An unconditional jump at the start of x86-64 code: `jmp rel32`,
/// `jmp rel8`, or `jmp *disp32(%rip)` (with a `bnd` prefix in PLTs built
/// for MPX), possibly after an `endbr64`.
pub fn x86_64_jump(code: &[u8], vaddr: u64, got: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
    let (code, pc) = match code.strip_prefix(&ENDBR64) {
        Some(rest) => (rest, vaddr + 4),
        None => (code, vaddr),
    };
    let rel32 = |b: &[u8]| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    match code {
        [0xe9, rest @ ..] if rest.len() >= 4 => Some(pc.wrapping_add_signed(5 + rel32(rest))),
        [0xeb, rel, ..] => Some(pc.wrapping_add_signed(2 + i64::from(*rel as i8))),
        [0xff, 0x25, rest @ ..] if rest.len() >= 4 => got(pc.wrapping_add_signed(6 + rel32(rest))),
        [0xf2, 0xff, 0x25, rest @ ..] if rest.len() >= 4 => {
            got(pc.wrapping_add_signed(7 + rel32(rest)))
        }
        _ => None,
    }
}

/// An unconditional jump at the start of AArch64 code: `b label`, or a PLT
/// entry (`adrp x16, page; ldr x17, [x16, #off]; ...; br x17`), possibly
/// after a `bti c`.
pub fn aarch64_jump(code: &[u8], vaddr: u64, got: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    const BTI_C: u32 = 0xd503_245f;
    let word = |i: usize| -> Option<u32> {
        let b = code.get(i * 4..i * 4 + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let (first, pc) = if word(0)? == BTI_C {
        (1, vaddr + 4)
    } else {
        (0, vaddr)
    };
    let insn = word(first)?;
    if insn & 0xfc00_0000 == 0x1400_0000 {
        // b: imm26, in words, signed.
        let imm = i64::from(((insn << 6) as i32) >> 6) * 4;
        return Some(pc.wrapping_add_signed(imm));
    }
    // adrp x16: immhi:immlo, in pages, signed.
    if insn & 0x9f00_001f != 0x9000_0010 {
        return None;
    }
    let pages = ((insn >> 5) & 0x7_ffff) << 2 | (insn >> 29) & 3;
    let pages = i64::from(((pages << 11) as i32) >> 11);
    let page = (pc & !0xfff).wrapping_add_signed(pages << 12);
    // ldr x17, [x16, #imm12 * 8]
    let ldr = word(first + 1)?;
    if ldr & 0xffc0_03ff != 0xf940_0211 {
        return None;
    }
    got(page + u64::from((ldr >> 10) & 0xfff) * 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_a_leading_null_check() {
        // glibc 2.36 free: test %rdi,%rdi; je rel32; push %rbp
        let free = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55];
        assert_eq!(null_check_len(&free), Some(9));
        assert_eq!(
            null_check_len(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x55, 0, 0, 0]),
            Some(5)
        );
        // malloc: push %r12
        assert_eq!(
            null_check_len(&[0x41, 0x54, 0x55, 0x53, 0, 0, 0, 0, 0]),
            None
        );
    }

    #[test]
    fn decodes_jumps() {
        let none = |_| None;
        // jmp rel32, forward and back.
        assert_eq!(
            x86_64_jump(&[0xe9, 0x10, 0, 0, 0], 0x1000, none),
            Some(0x1015)
        );
        assert_eq!(
            x86_64_jump(&[0xe9, 0xfb, 0xff, 0xff, 0xff], 0x1000, none),
            Some(0x1000)
        );
        // endbr64; jmp rel8
        assert_eq!(
            x86_64_jump(&[0xf3, 0x0f, 0x1e, 0xfa, 0xeb, 0xfe], 0x1000, none),
            Some(0x1004)
        );
        // jmp *0x10(%rip), bnd jmp *0x10(%rip)
        let got = |slot| (slot == 0x1016).then_some(0x5000);
        assert_eq!(
            x86_64_jump(&[0xff, 0x25, 0x10, 0, 0, 0], 0x1000, got),
            Some(0x5000)
        );
        let got = |slot| (slot == 0x1017).then_some(0x5000);
        assert_eq!(
            x86_64_jump(&[0xf2, 0xff, 0x25, 0x10, 0, 0, 0], 0x1000, got),
            Some(0x5000)
        );
        // push %rbp
        assert_eq!(x86_64_jump(&[0x55, 0x48, 0x89, 0xe5], 0x1000, none), None);
        assert_eq!(x86_64_jump(&[0xe9, 0x10], 0x1000, none), None, "cut short");

        let words = |w: &[u32]| w.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<_>>();
        // b .+8, b .-4
        assert_eq!(
            aarch64_jump(&words(&[0x1400_0002]), 0x1000, none),
            Some(0x1008)
        );
        assert_eq!(
            aarch64_jump(&words(&[0x17ff_ffff]), 0x1000, none),
            Some(0xffc)
        );
        // bti c; adrp x16, .+0x10000; ldr x17, [x16, #0x18]; add; br x17
        let plt = words(&[
            0xd503_245f,
            0x9000_0090,
            0xf940_0e11,
            0x9100_6210,
            0xd61f_0220,
        ]);
        let got = |slot| (slot == 0x1_1018).then_some(0x7000);
        assert_eq!(aarch64_jump(&plt, 0x1000, got), Some(0x7000));
        // stp x29, x30, [sp, #-16]!
        assert_eq!(aarch64_jump(&words(&[0xa9bf_7bfd]), 0x1000, none), None);
    }
}
