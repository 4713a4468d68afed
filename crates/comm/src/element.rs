//! Element types that collectives move and reduce.

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    F32,
    BF16,
    F16,
    I32,
    U8,
}

impl ElemKind {
    pub fn size(self) -> usize {
        match self {
            ElemKind::F32 | ElemKind::I32 => 4,
            ElemKind::BF16 | ElemKind::F16 => 2,
            ElemKind::U8 => 1,
        }
    }
}

/// A plain-old-data element a collective can carry.
///
/// # Safety
/// Implementors must have no padding and no invalid bit patterns (so any bytes are a valid value).
pub unsafe trait Element: Copy + Send + Sync + 'static {
    const KIND: ElemKind;
}

unsafe impl Element for f32 {
    const KIND: ElemKind = ElemKind::F32;
}
unsafe impl Element for bf16 {
    const KIND: ElemKind = ElemKind::BF16;
}
unsafe impl Element for f16 {
    const KIND: ElemKind = ElemKind::F16;
}
unsafe impl Element for i32 {
    const KIND: ElemKind = ElemKind::I32;
}
unsafe impl Element for u8 {
    const KIND: ElemKind = ElemKind::U8;
}

pub(crate) fn as_bytes<T: Element>(s: &[T]) -> &[u8] {
    // SAFETY: Element types are POD without padding.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

pub(crate) fn as_bytes_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: Element types are POD without padding and every byte pattern is a valid value.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

/// Reads element `i` of `bytes` (of `kind`) as f64, for reductions.
#[inline]
pub(crate) fn load(kind: ElemKind, bytes: &[u8], i: usize) -> f64 {
    let s = kind.size();
    let b = &bytes[i * s..(i + 1) * s];
    match kind {
        ElemKind::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
        ElemKind::BF16 => bf16::from_le_bytes(b.try_into().unwrap()).to_f64(),
        ElemKind::F16 => f16::from_le_bytes(b.try_into().unwrap()).to_f64(),
        ElemKind::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f64,
        ElemKind::U8 => b[0] as f64,
    }
}

/// Writes `x` as element `i` of `bytes` (of `kind`), rounding to the element type.
#[inline]
pub(crate) fn store(kind: ElemKind, bytes: &mut [u8], i: usize, x: f64) {
    let s = kind.size();
    let b = &mut bytes[i * s..(i + 1) * s];
    match kind {
        ElemKind::F32 => b.copy_from_slice(&(x as f32).to_le_bytes()),
        ElemKind::BF16 => b.copy_from_slice(&bf16::from_f64(x).to_le_bytes()),
        ElemKind::F16 => b.copy_from_slice(&f16::from_f64(x).to_le_bytes()),
        ElemKind::I32 => b.copy_from_slice(&(x as i32).to_le_bytes()),
        ElemKind::U8 => b[0] = x as u8,
    }
}
