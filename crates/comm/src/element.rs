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
    /// Wraps an owned vector for an asynchronous collective (no copy).
    fn into_buf(v: Vec<Self>) -> OwnedBuf;
    /// Unwraps a buffer of this element type; gives it back unchanged if it holds another type.
    fn from_buf(b: OwnedBuf) -> Result<Vec<Self>, OwnedBuf>;
}

/// An owned, typed buffer that an asynchronous collective holds until it completes, so the
/// caller cannot touch (or free) the memory a background transfer reads or writes.
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedBuf {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I32(Vec<i32>),
    U8(Vec<u8>),
}

impl OwnedBuf {
    pub fn kind(&self) -> ElemKind {
        match self {
            OwnedBuf::F32(_) => ElemKind::F32,
            OwnedBuf::BF16(_) => ElemKind::BF16,
            OwnedBuf::F16(_) => ElemKind::F16,
            OwnedBuf::I32(_) => ElemKind::I32,
            OwnedBuf::U8(_) => ElemKind::U8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            OwnedBuf::F32(v) => as_bytes(v),
            OwnedBuf::BF16(v) => as_bytes(v),
            OwnedBuf::F16(v) => as_bytes(v),
            OwnedBuf::I32(v) => as_bytes(v),
            OwnedBuf::U8(v) => v,
        }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            OwnedBuf::F32(v) => as_bytes_mut(v),
            OwnedBuf::BF16(v) => as_bytes_mut(v),
            OwnedBuf::F16(v) => as_bytes_mut(v),
            OwnedBuf::I32(v) => as_bytes_mut(v),
            OwnedBuf::U8(v) => v,
        }
    }

    /// An empty buffer (what a barrier gives back).
    pub fn empty() -> Self {
        OwnedBuf::U8(Vec::new())
    }
}

macro_rules! owned_buf_variant {
    ($t:ty, $v:ident) => {
        fn into_buf(v: Vec<Self>) -> OwnedBuf {
            OwnedBuf::$v(v)
        }
        fn from_buf(b: OwnedBuf) -> Result<Vec<Self>, OwnedBuf> {
            match b {
                OwnedBuf::$v(v) => Ok(v),
                other => Err(other),
            }
        }
    };
}

unsafe impl Element for f32 {
    const KIND: ElemKind = ElemKind::F32;
    owned_buf_variant!(f32, F32);
}
unsafe impl Element for bf16 {
    const KIND: ElemKind = ElemKind::BF16;
    owned_buf_variant!(bf16, BF16);
}
unsafe impl Element for f16 {
    const KIND: ElemKind = ElemKind::F16;
    owned_buf_variant!(f16, F16);
}
unsafe impl Element for i32 {
    const KIND: ElemKind = ElemKind::I32;
    owned_buf_variant!(i32, I32);
}
unsafe impl Element for u8 {
    const KIND: ElemKind = ElemKind::U8;
    owned_buf_variant!(u8, U8);
}

pub(crate) fn as_bytes<T: Element>(s: &[T]) -> &[u8] {
    // SAFETY: Element types are POD without padding.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

pub(crate) fn as_bytes_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: Element types are POD without padding and every byte pattern is a valid value.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}
